"""The weight layouts patch gives the FFN (separate or neuron-bundled), how the dense forward reads
them (views or contiguous copies), and that unpatch restores the original storage bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import glass_kernels
from glass_kernels import hf_compat, patch, session, tuning, unpatch
from glass_kernels.ffn import find_ffn_sites, is_patched
from glass_kernels.ffn.layout import is_bundled

import tiny_models as tm

BUNDLEABLE = [f for f in tm.FAMILIES if f != "phi3"]  # Phi-3's gate and up are one fused parameter
IDS, NEXT = torch.tensor([[5, 9, 17, 3, 8]]), torch.tensor([[11]])


def _snapshot(model):
    return {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}


def _same_storage_as(model, snap) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(
        torch.equal(now[k], v) and now[k].stride() == s and now[k].dtype == v.dtype for k, (v, s) in snap.items())


def _prompt_and_step(model):
    with torch.no_grad():
        out = model(IDS, use_cache=True)
        step = model(NEXT, **hf_compat.cache_kwargs(model, hf_compat.output_cache(out)))
    return out.logits, step.logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", BUNDLEABLE)
def test_bundled_layout_decodes_the_same_bits_and_unpatch_restores_it(family, dtype):
    model = tm.build(family, dtype=dtype)
    snap = _snapshot(model)
    got = {}
    for layout in ("separate", "bundled"):
        patch(model, method="griffin", keep=0.5, layout=layout, tune=False)
        assert session(model).layout == layout
        sites = find_ffn_sites(model)
        assert all(is_bundled(s.handler.bundle_params(s.module)) == (layout == "bundled") for s in sites)
        got[layout] = _prompt_and_step(model)
        unpatch(model)
        assert _same_storage_as(model, snap), f"unpatch after layout={layout} changed the weights"
    # the kernel reads the same values in the same order, from other addresses: the same bits
    torch.testing.assert_close(got["bundled"][1], got["separate"][1], rtol=0, atol=0)
    torch.testing.assert_close(got["bundled"][0], got["separate"][0], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_bundled_keep_one_matches_the_dense_model(family):
    model = tm.build(family)
    with torch.no_grad():
        dense = model.generate(IDS, max_new_tokens=6, do_sample=False)
    patch(model, method="griffin", keep=1.0, layout="bundled", tune=False)
    with torch.no_grad():
        sparse = model.generate(IDS, max_new_tokens=6, do_sample=False)
    assert session(model).counters()["sparse"] == 5
    unpatch(model)
    assert torch.equal(dense, sparse)


def test_a_fused_family_cannot_be_bundled_and_auto_keeps_it_separate():
    model = tm.build("phi3")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="layout=\"bundled\" is not possible for Phi3MLP"):
        patch(model, method="griffin", keep=0.5, layout="bundled", tune=False)
    assert _same_storage_as(model, snap) and not is_patched(model)
    patch(model, method="griffin", keep=0.5, layout="auto", tune=True)
    assert session(model).layout == "separate"
    unpatch(model)


def test_layout_argument_is_checked():
    with pytest.raises(ValueError, match="layout must be one of"):
        glass_kernels.GlassConfig(layout="interleaved")


@pytest.mark.parametrize("faster", ["bundled", "separate"])
def test_auto_applies_the_layout_the_measurement_chose(faster, monkeypatch, tmp_path):
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "other_load", lambda before, after: 0.0)
    timed = []

    def fake_measure(layers, dtype, d, keep=0.5, rounds=5, seed=0, compact=False):
        bundled = layers[0][0].stride(0) == 3 * d  # the views of the block
        timed.append("bundled" if bundled else "separate")
        fast = (faster == "bundled") == bundled
        return {("scalar", 1, 0): 20.0 if fast else 10.0}

    monkeypatch.setattr(tuning, "measure", fake_measure)
    model = tm.build("qwen3")
    snap = _snapshot(model)
    patch(model, method="griffin", keep=0.5, layout="auto", tune=True)
    assert timed == ["separate", "bundled", "separate", "bundled"]  # alternating phases
    assert session(model).layout == faster == session(model).decode_tuning.layout
    sites = find_ffn_sites(model)
    assert all(is_bundled(s.handler.bundle_params(s.module)) == (faster == "bundled") for s in sites)
    unpatch(model)
    assert _same_storage_as(model, snap)


# -- the dense forward on relaid weights: views or contiguous copies ----------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["separate", "bundled"])
def test_prompt_copies_compute_exactly_what_the_unpatched_model_computes(layout, dtype):
    model = tm.build("llama", dtype=dtype)
    with torch.no_grad():
        want = model(IDS).logits
    patch(model, method="dense", layout=layout, tune=False)
    state = session(model)._state
    params = [p for s in find_ffn_sites(model) for p in s.module.parameters()]
    ptrs = [p.data_ptr() for p in params]
    state.prompt_copy = tuning.PromptCopy(0.0, "test")  # always copy
    _set_relaid(model)
    with torch.no_grad():
        got = model(IDS).logits
    # the copies were the unpatched layout: the same arithmetic, the same bits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [p.data_ptr() for p in params] == ptrs  # the views are back after each forward
    state.prompt_copy = tuning.PromptCopy(math.inf, "test")  # never: the views (close, not exact)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want, rtol=2e-2, atol=2e-2)
    unpatch(model)


def _set_relaid(model):
    """What patch does once prompt_copy is known: each GlassFFN gets its relaid parameters."""
    from glass_kernels.patch.api import _ATTR

    rec = model.__dict__[_ATTR]
    for (_, _, _, glass), params in zip(rec.sites, rec.relaid):
        glass.__dict__["relaid"] = params


def test_prompt_copy_applies_from_its_token_count():
    pc = tuning.PromptCopy(8.0, "test")
    assert pc.copy and not pc.applies(7) and pc.applies(8)
    assert not tuning.PromptCopy(math.inf, "test").copy
    assert tuning.PromptCopy(0.0, "test").applies(1)


def test_copy_threshold_from_two_token_counts():
    # the views already slower at one token: the slow path, copy always
    assert tuning.copy_threshold({"copy": [1.0, 2.0], "view": [3.0, 40.0]}) == 0.0
    # views faster at both counts, and no cheaper per token: never
    assert tuning.copy_threshold({"copy": [3.0, 5.0], "view": [1.0, 2.0]}) == math.inf
    # views cheaper at one token, dearer per token: where the two lines cross (at 3 tokens)
    # (copy: 1.9 + 0.1 t, views: 0 + 1.0 t)
    assert tuning.copy_threshold({"copy": [2.0, 2.7], "view": [1.0, 8.0]}) == pytest.approx(1.9 / 0.9)


def test_prompt_copy_default_without_a_measurement():
    for dtype, copies in ((torch.float32, False), (torch.bfloat16, True)):
        model = tm.build("llama", dtype=dtype)
        patch(model, method="griffin", keep=0.5, tune=False)
        pc = session(model).prompt_copy
        assert pc.source == "default" and pc.copy == copies
        unpatch(model)


def test_prompt_copy_is_measured_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path))
    # a quiet machine, whatever else runs beside the tests (a busy one is used but never cached)
    monkeypatch.setattr(tuning, "other_load", lambda before, after: 0.0)
    model = tm.build("llama", dtype=torch.bfloat16)
    patch(model, method="griffin", keep=0.5, layout="separate", tune=True)
    pc = session(model).prompt_copy
    assert pc.source == "measured" and len(pc.ms["copy"]) == 2
    unpatch(model)
    patch(model, method="griffin", keep=0.5, layout="separate", tune=True)
    assert session(model).prompt_copy.source == "cached"
    assert session(model).prompt_copy.min_tokens == pc.min_tokens
    unpatch(model)


def test_a_failure_after_the_relayout_restores_everything(monkeypatch):
    model = tm.build("mistral")
    snap = _snapshot(model)
    modules = [type(m).__name__ for m in model.modules()]

    def boom(*a, **k):
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(tuning, "prompt_copy_for_model", boom)
    with pytest.raises(RuntimeError, match="measurement failed"):
        patch(model, method="griffin", keep=0.5, layout="bundled", tune=False)
    assert _same_storage_as(model, snap)
    assert [type(m).__name__ for m in model.modules()] == modules
    assert not is_patched(model)


def test_relaid_weights_are_advised_huge_pages(monkeypatch):
    """Large CPU blocks are advised MADV_HUGEPAGE on whole 2 MiB pages inside them, before they are
    filled; small ones are not (and the values are what torch.empty + copy would give)."""
    from glass_kernels.ffn import layout

    calls = []
    monkeypatch.setattr(layout, "_libc_madvise", lambda: (lambda a, n, adv: calls.append((a, n, adv)) or 0))
    t = layout.empty_huge_pages((1024, 3, 2048), torch.float32, "cpu")  # 24 MiB
    assert t.shape == (1024, 3, 2048) and t.dtype == torch.float32
    (a, n, adv), = calls
    assert adv == 14 and a % (2 << 20) == 0 and n % (2 << 20) == 0
    assert t.data_ptr() <= a and a + n <= t.data_ptr() + t.numel() * 4 and n >= 20 << 20
    layout.empty_huge_pages((64, 64), torch.float32, "cpu")  # 16 KiB: not advised
    assert len(calls) == 1
    rows = [torch.randn(300, 40) for _ in range(3)]
    views = layout.bundled_views(rows)
    assert all(torch.equal(v, r) for v, r in zip(views, rows))


def _advised_ranges(monkeypatch):
    """Record the ranges given to madvise (no real advice is given)."""
    from glass_kernels.ffn import layout

    calls = []
    monkeypatch.setattr(layout, "_libc_madvise", lambda: (lambda a, n, adv: calls.append((a, a + n)) or 0))
    return calls


def _advised(t: torch.Tensor, calls, share: float = 0.5) -> bool:
    """Whether advised ranges cover at least ``share`` of the memory t's elements span (whole 2 MiB
    pages are advised, so a partial last page may not be; a bundled view spans its block)."""
    lo = t.data_ptr()
    hi = lo + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()
    covered = sum(max(0, min(b, hi) - max(a, lo)) for a, b in calls)
    return covered >= share * (hi - lo)


@pytest.mark.parametrize("mib, advised_mib", [(3, 2), (39, 40), (2, 2)])
def test_huge_page_tensors_start_on_a_huge_page(monkeypatch, mib, advised_mib):
    """A tensor of >= 2 MiB starts on a 2 MiB boundary (the advice takes only whole aligned pages:
    a 3 MiB tensor used to get none); the advice runs to its end rounded up where that backs at most
    1/16 more memory (39 -> 40 MiB), else down (3 -> 2 MiB)."""
    from glass_kernels.ffn import layout

    calls = _advised_ranges(monkeypatch)
    t = layout.empty_huge_pages((mib << 18,), torch.float32, "cpu")
    (a, end), = calls
    n = end - a
    assert a == t.data_ptr() and a % (2 << 20) == 0 and n == advised_mib << 20
    assert t.untyped_storage().nbytes() >= (max(mib, advised_mib) << 20)  # the advised range is inside it
    t.fill_(1.5)
    assert t.shape == (mib << 18,) and float(t.sum()) == 1.5 * (mib << 18)


def test_a_small_model_layer_fills_whole_huge_pages(monkeypatch):
    """SmolLM2's operands are 3.4 MiB each: one allocation per layer gives each of them huge pages
    almost entirely (each in its own allocation, 41% of every operand would stay in 4 KiB pages)."""
    from glass_kernels.ffn import layout

    calls = _advised_ranges(monkeypatch)
    w = [torch.nn.Parameter(torch.randn(1536, 576)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(1536, 576).t())]
    values = [p.detach().clone() for p in w]
    assert layout.pack_huge_pages(w)
    assert all(torch.equal(p, v) for p, v in zip(w, values))
    assert w[0].is_contiguous() and w[1].is_contiguous() and w[2].t().is_contiguous()  # layouts kept
    assert len({p.untyped_storage().data_ptr() for p in w}) == 1 and len(calls) == 1
    assert all(_advised(p.data, calls, share=0.9) for p in w)
    assert not layout.pack_huge_pages([torch.nn.Parameter(torch.randn(64, 64))])  # too small: stays


@pytest.mark.parametrize("layout_name", ["separate", "bundled"])
def test_every_ffn_weight_the_kernel_reads_is_advised_huge_pages(monkeypatch, layout_name):
    """W_gate and W_up (already neuron-major, left in place by the relayout) move into advised memory
    too, in either layout; the dense model's values and layout come back bit for bit on unpatch."""
    calls = _advised_ranges(monkeypatch)
    # 4 MiB per weight: large enough to hold whole huge pages
    model = tm.build("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=1)
    snap = _snapshot(model)
    patch(model, method="griffin", keep=0.5, layout=layout_name, tune=False)
    sites = find_ffn_sites(model)
    for w in sites[0].handler.weights(sites[0].module):
        assert _advised(w, calls), "a weight the kernel reads is not in huge-page-advised memory"
    assert len({w.untyped_storage().data_ptr() for w in sites[0].handler.weights(sites[0].module)}) == 1
    calls.clear()
    unpatch(model)
    assert _same_storage_as(model, snap)
    # the layer's weights come back in advised memory too, in one allocation (the model's pages keep
    # their size, and nothing of the patched storage outlives it)
    mlp = model.model.layers[0].mlp
    restored = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    assert all(_advised(p.data, calls) for p in restored)
    assert len({p.untyped_storage().data_ptr() for p in restored}) == 1


def test_separate_after_bundle_stays_in_advised_memory(monkeypatch):
    """Tuning may time the bundled layout and then settle on the separate one: the rows it
    separates again keep the huge-page advice."""
    from glass_kernels.ffn import layout

    calls = _advised_ranges(monkeypatch)
    lin = [torch.nn.Parameter(torch.randn(2048, 512)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(512, 2048))]
    values = [p.detach().clone() for p in lin]
    params = [(lin[0], False), (lin[1], False), (lin[2], True)]
    layout.bundle(params)
    calls.clear()
    layout.separate(params)
    assert all(torch.equal(p, v) for p, v in zip(lin, values))
    assert lin[0].is_contiguous() and lin[1].is_contiguous() and lin[2].t().is_contiguous()
    assert all(_advised(p.data, calls) for p in lin)


def test_to_huge_pages_leaves_small_or_strided_weights_alone(monkeypatch):
    from glass_kernels.ffn import layout

    calls = _advised_ranges(monkeypatch)
    small = torch.nn.Parameter(torch.randn(64, 64))
    strided = torch.nn.Parameter(torch.randn(2048, 1024).t())
    before = (small.data_ptr(), strided.data_ptr())
    assert not layout.to_huge_pages(small) and not layout.to_huge_pages(strided)
    assert (small.data_ptr(), strided.data_ptr()) == before and not calls
    big = torch.nn.Parameter(torch.randn(1024, 2048))
    v = big.detach().clone()
    assert layout.to_huge_pages(big) and torch.equal(big, v) and _advised(big.data, calls)
