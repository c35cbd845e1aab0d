"""The decode kernel's per-machine setting: neuron groups are correct for every setting on every
ISA, the C ABI validates the setting, and glass_kernels.tuning measures, caches, honours the
environment and never trusts a corrupt cache. No timing is asserted."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import glass_kernels
import tiny_models as tm
from glass_kernels import _ext, ops, tuning
from glass_kernels.patch import patch, session, unpatch
from test_ops import _idx, _weights, native_ffn
from tolerances import assert_close_derived

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not available ({_ext.load_error()})")


@pytest.fixture
def setting():
    """Restores the core's ISA and decode setting after the test."""
    C = _ext.require()
    saved = C.get_isa(), C.get_decode_tuning()
    yield C
    C.set_isa(saved[0])
    C.set_decode_tuning(*saved[1])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path))
    for var in tuning.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    # a quiet machine, whatever else runs beside the tests (the busy case has its own test)
    monkeypatch.setattr(tuning, "other_load", lambda before, after: 0.0)
    monkeypatch.setattr(tuning, "_BUSY_SETTINGS", {})  # no busy measurement of another test
    return tmp_path


# -- correctness of every setting --------------------------------------------------------------

@pytest.mark.parametrize("isa", _ext.supported_isas() or ["none"])
@pytest.mark.parametrize("group,prefetch", [(1, 0), (2, 0), (3, 1), (4, 4), (5, 2), (7, 9), (8, 0), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_neuron_groups_match_the_oracle(setting, isa, group, prefetch, dtype, rng):
    C = setting
    C.set_isa(isa)
    C.set_decode_tuning(group, prefetch)
    # T = 1 per index set (the grouped path): one sequence, and three with their own sets; k not a
    # multiple of the group (remainder groups), odd d (vector tails)
    for B, d, D, k, batched in ((1, 37, 61, 29, False), (3, 70, 45, 11, True), (2, 16, 9, 1, True)):
        wg, wu, wd = _weights(rng, D, d, dtype)
        x = torch.randn(B, 1, d, generator=rng).to(dtype)
        idx = _idx(rng, B, D, k, batched, torch.int32, False)
        with glass_kernels.backend("cpp"):
            y = ops.sparse_ffn(x, wg, wu, wd, idx, "silu")
            b_in = torch.randn(D, generator=rng).to(dtype)
            b_out = torch.randn(d, generator=rng).to(dtype)
            z = ops.sparse_mlp(x, wg, b_in, wd, b_out, idx, "gelu_tanh")
        oracle = native_ffn(x, wg, wu, wd, None, None, idx, "silu", torch.float64)
        same = native_ffn(x, wg, wu, wd, None, None, idx, "silu", dtype)
        assert_close_derived(y, oracle, same, f"sparse_ffn[{isa}, group {group}]")
        oracle = native_ffn(x, wg, None, wd, b_in, b_out, idx, "gelu_tanh", torch.float64)
        same = native_ffn(x, wg, None, wd, b_in, b_out, idx, "gelu_tanh", dtype)
        assert_close_derived(z, oracle, same, f"sparse_mlp[{isa}, group {group}]")


def test_grouped_results_do_not_depend_on_threads(setting, rng):
    C = setting
    C.set_decode_tuning(4, 4)
    wg, wu, wd = _weights(rng, 300, 96, torch.float32)
    x = torch.randn(1, 1, 96, generator=rng)
    idx = _idx(rng, 1, 300, 211, False, torch.int32, False)
    outs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)  # the ops run the core with torch's thread count
            outs.append(ops.sparse_ffn(x, wg, wu, wd, idx, "silu"))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_decode_tuning_is_validated(setting):
    C = setting
    C.set_decode_tuning(3, 7)
    assert C.get_decode_tuning() == (3, 7)
    for bad in ((0, 0), (9, 0), (4, -1), (4, 65)):
        with pytest.raises(ValueError, match="set_decode_tuning"):
            C.set_decode_tuning(*bad)
    assert C.get_decode_tuning() == (3, 7)  # unchanged by the rejected calls


# -- measuring, choosing, caching ----------------------------------------------------------------

def test_choose_prefers_the_fastest_then_the_simplest():
    assert tuning.choose({("avx2", 1, 0): 10.0, ("avx2", 4, 0): 15.0, ("avx2", 8, 8): 14.0}) == ("avx2", 4, 0, "separate")
    # within 2% of the best: fewer neurons in flight, then less prefetch
    assert tuning.choose({("a", 8, 8): 15.0, ("a", 4, 4): 14.9, ("a", 4, 0): 14.8}) == ("a", 4, 0, "separate")


def test_choose_takes_the_bundled_layout_only_with_a_margin():
    sep = {("a", 4, 0): 10.0, ("a", 1, 0): 9.0}
    assert tuning.choose({**sep, ("a", 8, 0, "bundled"): 10.1})[3] == "separate"  # within 2%
    assert tuning.choose({**sep, ("a", 8, 0, "bundled"): 10.5}) == ("a", 8, 0, "bundled")
    # the compacted copy is compared with the chosen (bundled) candidate
    assert not tuning.compact_is_faster({**sep, ("a", 8, 0, "bundled"): 12.0, ("a", 1, 0, "compact"): 12.5})


def test_measure_times_every_candidate_and_restores_the_setting(setting, rng):
    C = setting
    C.set_decode_tuning(2, 3)
    layers = [tuple(_weights(rng, 64, 48, torch.float32)) for _ in range(3)]  # neuron-major [D, d]
    isa_before = C.get_isa()
    gbps = tuning.measure(layers, torch.float32, 48, keep=0.5, rounds=1)
    isas = tuning._isa_candidates(lambda: C.kernel_name("float32", True))
    want = {(i, n, p) for i in isas for n, p in tuning.CANDIDATES}
    assert set(gbps) == want and all(v > 0 for v in gbps.values())
    assert C.get_decode_tuning() == (2, 3) and C.get_isa() == isa_before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_each_kernel_is_timed_once(setting, dtype):
    # avx512_ext / neon_ext run the plain path's kernel for the dtypes without an extension kernel:
    # timing both would only double the measurement
    C = setting
    before = C.get_isa()
    names = {}
    for isa in _ext.supported_isas():
        C.set_isa(isa)
        names[isa] = C.kernel_name(dtype, True)
    C.set_isa(before)
    got = tuning._isa_candidates(lambda: C.kernel_name(dtype, True))
    vector = [i for i in names if i != "scalar"] or ["scalar"]
    assert len(got) == len({names[i] for i in got}), "a kernel timed twice"
    assert {names[i] for i in got} == {names[i] for i in vector}, "a kernel never timed"
    assert C.get_isa() == before


def test_tiny_models_keep_the_defaults_unless_asked(cache, setting):
    model = tm.build("llama")
    patch(model, method="griffin", keep=0.5)  # tune="auto": a tiny FFN says nothing about DRAM
    assert session(model).decode_tuning.source == "default"
    assert not (cache / "tuning").exists()
    unpatch(model)


def test_auto_measures_models_above_the_size_floor_whatever_the_cache(cache, setting, monkeypatch):
    # the floor is a model size, not a multiple of the (VM-reported) last-level cache
    model = tm.build("llama")
    monkeypatch.setattr(tuning, "MIN_MEASURED_FFN_BYTES", 1)
    real = tuning.measure
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: real(*a, **{**k, "rounds": 1}))
    patch(model, method="griffin", keep=0.5)  # tune="auto"
    assert session(model).decode_tuning.source.startswith("measured")
    unpatch(model)


def test_measured_once_then_cached(cache, setting, monkeypatch):
    model = tm.build("qwen2")
    calls = []
    real = tuning.measure
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: calls.append(1) or real(*a, **{**k, "rounds": 1}))
    patch(model, method="griffin", keep=0.5, tune=True)
    t = session(model).decode_tuning
    # layout "auto": both layouts timed, alternating (separate, bundled, separate, bundled)
    assert t.source == "measured" and len(calls) == 4 and t.isa in _ext.supported_isas()
    assert {k.endswith("/bundled") for k in t.gbps} == {True, False} and t.layout in ("separate", "bundled")
    assert session(model).layout == t.layout
    unpatch(model)
    doc = json.loads(tuning.cache_file().read_text())
    entry = doc["entries"][f"float32/d{tm.D_MODEL}/t{torch.get_num_threads()}/auto/{_ext.threading()}"]
    assert entry["isa"] == t.isa and entry["versions"]["glass_kernels_commit"]
    patch(model, method="griffin", keep=0.5, tune=True)
    assert session(model).decode_tuning.source == "cached" and len(calls) == 4
    assert session(model).layout == t.layout
    # the cached setting is what the core runs once a sequence decodes
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7]]), use_cache=True)
        model(torch.tensor([[8]]), **glass_kernels.hf_compat.cache_kwargs(model, glass_kernels.hf_compat.output_cache(out)))
    assert setting.get_decode_tuning() == (t.neurons_in_flight, t.prefetch_neurons)
    unpatch(model)


def test_a_measurement_of_another_build_is_measured_again(cache, setting, monkeypatch):
    """Kernels change between builds (a faster quantized path changes its best neurons in flight):
    a cached setting only counts for the build of the core that measured it."""
    model = tm.build("qwen2")
    calls = []
    real = tuning.measure
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: calls.append(1) or real(*a, **{**k, "rounds": 1}))
    patch(model, method="griffin", keep=0.5, tune=True, layout="separate")
    unpatch(model)
    doc = json.loads(tuning.cache_file().read_text())
    assert doc["entries"] and len(calls) == 1
    for entry in doc["entries"].values():
        assert entry["build"] == _ext.build_id()
        entry["build"] = "0" * 16  # as written by an older build
    tuning.cache_file().write_text(json.dumps(doc))
    patch(model, method="griffin", keep=0.5, tune=True, layout="separate")
    assert session(model).decode_tuning.source == "measured" and len(calls) == 2
    unpatch(model)
    patch(model, method="griffin", keep=0.5, tune=True, layout="separate")
    assert session(model).decode_tuning.source == "cached" and len(calls) == 2
    unpatch(model)


def test_corrupt_cache_is_ignored_and_replaced(cache, setting, caplog):
    path = tuning.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    model = tm.build("llama")
    with caplog.at_level(logging.WARNING, logger="glass_kernels.tuning"):
        patch(model, method="griffin", keep=0.5, tune=True)
    assert any("unreadable tuning cache" in r.getMessage() for r in caplog.records)
    assert session(model).decode_tuning.source == "measured"
    assert json.loads(path.read_text())["format"] == tuning._FORMAT
    unpatch(model)


def test_environment_wins_over_the_measurement(cache, setting, monkeypatch):
    C = setting
    C.set_decode_tuning(2, 5)  # as if the core had read GLASS_NEURONS_IN_FLIGHT=2 at start-up
    monkeypatch.setenv("GLASS_NEURONS_IN_FLIGHT", "2")
    tuning.apply(tuning.DecodeTuning(C.get_isa(), 8, 8, "measured"))
    assert C.get_decode_tuning() == (2, 8)  # the environment's count stays, the prefetch is applied


def test_tune_argument_is_checked():
    with pytest.raises(ValueError, match="tune must be"):
        glass_kernels.GlassConfig(tune="yes")


# -- strategy: in place or from a compacted copy ------------------------------------------------

def _decode_logits(model, ids, nxt):
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = glass_kernels.hf_compat.output_cache(out)
        return model(nxt, **glass_kernels.hf_compat.cache_kwargs(model, cache)).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compact_copy_reads_the_same_bits(family):
    model = tm.build(family)
    ids, nxt = torch.tensor([[5, 9, 17, 3]]), torch.tensor([[11]])
    got = {}
    for strategy in ("gather", "compact"):
        patch(model, method="griffin", keep=0.5, strategy=strategy, tune=False)
        got[strategy] = _decode_logits(model, ids, nxt)
        assert session(model).strategy == strategy
        copies = session(model).memory_overhead()["compact_copies"]
        assert (copies > 0) == (strategy == "compact")
        unpatch(model)
    assert torch.equal(got["gather"], got["compact"])


def test_compact_needs_one_shared_set(caplog):
    model = tm.build("qwen3")
    patch(model, method="griffin", keep=0.5, strategy="compact", tune=False)
    ids = torch.tensor([[5, 9, 17, 3], [7, 8, 30, 2]])  # two prompts: two sets
    with caplog.at_level(logging.WARNING, logger="glass_kernels.patch"):
        _decode_logits(model, ids, torch.tensor([[11], [12]]))
    assert session(model).strategy == "gather"
    assert any("needs one neuron set" in r.getMessage() for r in caplog.records)


def test_auto_copies_only_where_measured_faster():
    model = tm.build("llama")
    ids, nxt = torch.tensor([[5, 9, 17, 3]]), torch.tensor([[11]])
    for faster, want in ((False, "gather"), (True, "compact")):
        patch(model, method="griffin", keep=0.5, strategy="auto", tune=False)
        state = session(model)._state
        state.decode_tuning = tuning.DecodeTuning("scalar", 1, 0, "default", None, faster)
        _decode_logits(model, ids, nxt)
        assert session(model).strategy == want
        unpatch(model)


def test_compact_is_faster_needs_a_clear_margin():
    base = {("avx2", 4, 0): 10.0, ("avx2", 1, 0): 8.0}
    assert not tuning.compact_is_faster(base)
    assert not tuning.compact_is_faster({**base, ("avx2", 4, 0, "compact"): 10.4})
    assert tuning.compact_is_faster({**base, ("avx2", 1, 0, "compact"): 10.6})
    assert tuning.choose({**base, ("avx2", 1, 0, "compact"): 99.0}) == ("avx2", 4, 0, "separate")


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(cache, setting, monkeypatch, caplog):
    monkeypatch.setattr(tuning, "other_load", lambda before, after: 1.5)  # as if 1.5 cores competed
    model = tm.build("llama")
    with caplog.at_level(logging.WARNING, logger="glass_kernels.tuning"):
        patch(model, method="griffin", keep=0.5, tune=True)
    t = session(model).decode_tuning
    assert "busy" in t.source and t.gbps is not None
    assert not tuning.cache_file().exists()
    assert any("not caching it" in r.getMessage() for r in caplog.records)
    with torch.no_grad():  # still the setting the core runs for this model
        out = model(torch.tensor([[5, 6, 7]]), use_cache=True)
        model(torch.tensor([[8]]), **glass_kernels.hf_compat.cache_kwargs(model, glass_kernels.hf_compat.output_cache(out)))
    assert setting.get_decode_tuning() == (t.neurons_in_flight, t.prefetch_neurons)
    unpatch(model)
    # patched again in the same process: that setting again, neither measured nor warned about anew
    caplog.clear()
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured again"))
    with caplog.at_level(logging.WARNING, logger="glass_kernels.tuning"):
        patch(model, method="griffin", keep=0.5, tune=True)
    again = session(model).decode_tuning
    assert (again.isa, again.neurons_in_flight, again.prefetch_neurons) == (t.isa, t.neurons_in_flight,
                                                                            t.prefetch_neurons)
    assert "earlier in this process" in again.source and not caplog.records
    assert not tuning.cache_file().exists()
    unpatch(model)


def test_quantized_rows_are_measured_on_their_own_rows_then_cached(cache, setting, monkeypatch):
    model = tm.build("llama", **tm.width_overrides("llama", 64))
    monkeypatch.setattr(tuning, "MIN_MEASURED_FFN_BYTES", 1)
    calls = []
    real = tuning.measure_quantized
    monkeypatch.setattr(tuning, "measure_quantized",
                        lambda *a, **k: calls.append(a[1]) or real(*a, **{**k, "rounds": 1}))
    patch(model, method="griffin", keep=0.5, weights="int8")
    t = session(model).decode_tuning
    assert t.source == "measured" and calls == ["q8_0"] and t.layout == "bundled"
    assert all(k.count("/") == 2 for k in t.gbps)  # isa / in flight / prefetch
    unpatch(model)
    doc = json.loads(tuning.cache_file().read_text())
    assert any(k.endswith("/bundled/" + str(_ext.threading()) + "/q8_0") for k in doc["entries"])
    model = tm.build("llama", **tm.width_overrides("llama", 64))
    patch(model, method="griffin", keep=0.5, weights="int8")
    assert session(model).decode_tuning.source == "cached" and calls == ["q8_0"]
    y = model(torch.tensor([[3, 5, 7]])).logits  # the setting in force runs (prompt, then decode)
    assert torch.isfinite(y).all()
    unpatch(model)
