"""GlobalStats: construction, ranks, save/load round trip, metadata, model checks, bad files."""

import json
import struct
from types import SimpleNamespace

import pytest
import torch

from glass_kernels import stats as stats_mod
from glass_kernels.stats import GlobalStats, StatsFileError, StatsMismatchError


def _random_stats(layers=3, D=(37, 37, 37), seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    act = [torch.rand(D[i], generator=g) * 5 for i in range(layers)]
    imp = [torch.rand(D[i], generator=g) * 7 for i in range(layers)]
    return GlobalStats(act, imp, dict(meta), num_tokens=1234)


# ---- a minimal model + site finder, so these tests exercise the stats logic on its own ----------
# (the real registry is glass_kernels.patch.find_ffn_sites; test_real_registry_* uses it when present)

class _MLP(torch.nn.Module):
    def __init__(self, d, D):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, D, bias=False)
        self.up_proj = torch.nn.Linear(d, D, bias=False)
        self.down_proj = torch.nn.Linear(D, d, bias=False)


class _Model(torch.nn.Module):
    def __init__(self, layers=2, d=16, D=40, seed=0, model_type="toy"):
        super().__init__()
        torch.manual_seed(seed)
        self.mlps = torch.nn.ModuleList([_MLP(d, D) for _ in range(layers)])
        self.config = SimpleNamespace(model_type=model_type)


_HANDLER = SimpleNamespace(
    intermediate_module=lambda m: m.down_proj,
    down_weight=lambda m: m.down_proj.weight,
)


def _toy_sites(model):
    return [
        SimpleNamespace(name=f"mlps.{i}", layer=i, module=m, handler=_HANDLER)
        for i, m in enumerate(model.mlps)
    ]


@pytest.fixture
def toy_sites(monkeypatch):
    monkeypatch.setattr(stats_mod, "_ffn_sites", _toy_sites)


def _stats_for(model, seed=0, **meta):
    D = [s.handler.down_weight(s.module).shape[1] for s in _toy_sites(model)]
    raw = _random_stats(len(D), D, seed)
    return GlobalStats.for_model(model, raw.activation, raw.impact, num_tokens=99, **meta)


# ---- construction / validation ----------------------------------------------------------------

def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="impact"):
        GlobalStats([torch.ones(4)], [torch.ones(4), torch.ones(4)])
    with pytest.raises(ValueError, match="layer 0"):
        GlobalStats([torch.ones(4)], [torch.ones(5)])
    with pytest.raises(ValueError, match=r"activation\[0\].*NaN"):
        GlobalStats([torch.tensor([1.0, float("nan")])], [torch.ones(2)])
    with pytest.raises(ValueError, match=r"impact\[0\].*negative"):
        GlobalStats([torch.ones(2)], [torch.tensor([1.0, -1.0])])
    with pytest.raises(ValueError, match=r"activation\[0\].*1-D"):
        GlobalStats([torch.ones(2, 2)], [torch.ones(4)])
    with pytest.raises(TypeError, match="activation"):
        GlobalStats(torch.ones(3, 4), [torch.ones(4)] * 3)
    with pytest.raises(ValueError, match="at least one layer"):
        GlobalStats([], [])


def test_constructor_casts_to_fp32_cpu_and_fills_meta():
    s = GlobalStats([torch.ones(5, dtype=torch.bfloat16)], [torch.ones(5, dtype=torch.float16)], num_tokens=3)
    assert s.activation[0].dtype == torch.float32 and s.impact[0].dtype == torch.float32
    assert s.meta["num_layers"] == 1 and s.meta["D"] == [5] and s.meta["num_tokens"] == 3
    assert s.num_layers == 1 and s.D == [5]


# ---- ranks ----------------------------------------------------------------------------------

def test_ranks_order_and_tie_rule():
    act = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    s = GlobalStats([act], [act.flip(0)])
    r = s.ranks("activation")[0]
    assert r.dtype == torch.int32
    # 3.0 at indices 1, 2, 4 -> ranks 1, 2, 3 (lower index better); then 2.0, 1.0, 0.5.
    assert r.tolist() == [5, 1, 2, 6, 3, 4]
    ri = s.ranks("impact")[0]
    # flipped: [2.0, 3.0, 0.5, 3.0, 3.0, 1.0] -> 3.0 at 1, 3, 4
    assert ri.tolist() == [4, 1, 6, 2, 3, 5]
    with pytest.raises(ValueError, match="kind"):
        s.ranks("bogus")


def test_ranks_all_equal_is_identity_and_permutation():
    s = GlobalStats([torch.zeros(11)], [torch.rand(11)])
    assert s.ranks("activation")[0].tolist() == list(range(1, 12))
    r = s.ranks("impact")[0]
    assert sorted(r.tolist()) == list(range(1, 12))
    # rank 1 is the argmax
    assert int(torch.argmin(r)) == int(torch.argmax(s.impact[0]))


# ---- save / load ----------------------------------------------------------------------------

def test_save_load_round_trip_bit_exact(tmp_path):
    s = _random_stats(4, (37, 50, 1, 37), seed=3, source="text", seq_len=64, seed_value=7,
                      nested={"a": [1, 2]})
    p = tmp_path / "s.safetensors"
    s.save(p)
    t = GlobalStats.load(p)
    assert t.num_layers == 4 and t.D == [37, 50, 1, 37] and t.num_tokens == 1234
    for a, b in zip(s.activation + s.impact, t.activation + t.impact):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert t.meta == s.meta
    assert t.meta["nested"] == {"a": [1, 2]}
    for kind in ("activation", "impact"):
        assert all(torch.equal(x, y) for x, y in zip(s.ranks(kind), t.ranks(kind)))


def test_header_holds_json_metadata(tmp_path):
    from safetensors import safe_open

    s = _random_stats(2, (8, 8), source="nps")
    p = tmp_path / "s.safetensors"
    s.save(p)
    with safe_open(str(p), framework="pt") as f:
        h = f.metadata()
        keys = set(f.keys())
    assert h["format"] == stats_mod.FORMAT and h["format_version"] == str(stats_mod.FORMAT_VERSION)
    assert json.loads(h["source"]) == "nps" and json.loads(h["D"]) == [8, 8]
    assert keys == {"activation.0", "activation.1", "impact.0", "impact.1"}


def test_save_rejects_non_json_meta(tmp_path):
    s = _random_stats(1, (4,), bad=object())
    with pytest.raises(ValueError, match="bad"):
        s.save(tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_load_missing_corrupt_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(StatsFileError, match="not found"):
        GlobalStats.load(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(StatsFileError, match="not a readable safetensors"):
        GlobalStats.load(garbage)
    good = tmp_path / "good.safetensors"
    _random_stats(2, (8, 8)).save(good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 10])
    with pytest.raises(StatsFileError, match="not a readable safetensors"):
        GlobalStats.load(trunc)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(3)}, str(foreign))
    with pytest.raises(StatsFileError, match="not a glass_kernels GlobalStats"):
        GlobalStats.load(foreign)
    missing = tmp_path / "missing.safetensors"
    save_file({"activation.0": torch.ones(3)}, str(missing),
              metadata={"format": stats_mod.FORMAT, "format_version": str(stats_mod.FORMAT_VERSION)})
    with pytest.raises(StatsFileError, match="missing tensors"):
        GlobalStats.load(missing)
    wrong_version = tmp_path / "v.safetensors"
    save_file({"activation.0": torch.ones(3), "impact.0": torch.ones(3)}, str(wrong_version),
              metadata={"format": stats_mod.FORMAT, "format_version": "999"})
    with pytest.raises(StatsFileError, match="version"):
        GlobalStats.load(wrong_version)
    bad_values = tmp_path / "neg.safetensors"
    save_file({"activation.0": -torch.ones(3), "impact.0": torch.ones(3)}, str(bad_values),
              metadata={"format": stats_mod.FORMAT, "format_version": str(stats_mod.FORMAT_VERSION)})
    with pytest.raises(StatsFileError, match="inconsistent"):
        GlobalStats.load(bad_values)


def test_load_rejects_header_length_corruption(tmp_path):
    good = tmp_path / "good.safetensors"
    _random_stats(1, (8,)).save(good)
    data = bytearray(good.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)  # header length beyond the file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(StatsFileError):
        GlobalStats.load(bad)


# ---- model checks ---------------------------------------------------------------------------

def test_for_model_metadata(toy_sites):
    m = _Model(layers=3, d=16, D=40)
    s = _stats_for(m, source="nps", num_sequences=4, seq_len=32, seed=0)
    assert s.meta["architecture"] == "_Model" and s.meta["model_type"] == "toy"
    assert s.meta["num_layers"] == 3 and s.meta["d"] == [16] * 3 and s.meta["D"] == [40] * 3
    assert isinstance(s.meta["fingerprint"], str) and len(s.meta["fingerprint"]) == 32
    assert s.meta["source"] == "nps" and s.meta["seq_len"] == 32 and s.num_tokens == 99
    assert {"torch", "transformers", "glass_kernels"} <= set(s.meta["versions"])
    s.check_model(m)


def test_check_model_after_round_trip(toy_sites, tmp_path):
    m = _Model()
    s = _stats_for(m)
    p = tmp_path / "s.safetensors"
    s.save(p)
    t = GlobalStats.load(p, model=m)
    assert t.meta["fingerprint"] == s.meta["fingerprint"]
    assert all(torch.equal(a, b) for a, b in zip(s.fingerprint_samples, t.fingerprint_samples))


@pytest.mark.parametrize(
    "other, what",
    [
        (dict(layers=3), "layers"),
        (dict(d=24), "d \\(hidden size\\)"),
        (dict(D=48), "D \\(FFN size\\)"),
        (dict(seed=1), "fingerprint"),
        (dict(model_type="other"), "model_type"),
    ],
)
def test_check_model_rejects_other_model(toy_sites, tmp_path, other, what):
    m = _Model()
    s = _stats_for(m)
    kw = dict(layers=2, d=16, D=40, seed=0, model_type="toy")
    kw.update(other)
    m2 = _Model(**kw)
    with pytest.raises(StatsMismatchError, match=what):
        s.check_model(m2)
    p = tmp_path / "s.safetensors"
    s.save(p)
    with pytest.raises(StatsMismatchError, match=what):
        GlobalStats.load(p, model=m2)
    assert issubclass(StatsMismatchError, ValueError)


def test_fingerprint_detects_single_layer_change(toy_sites):
    m = _Model(layers=4)
    s = _stats_for(m)
    with torch.no_grad():
        m.mlps[2].down_proj.weight.mul_(1.5)
    with pytest.raises(StatsMismatchError, match=r"first differing layers \[2\]"):
        s.check_model(m)


def test_fingerprint_independent_of_storage_layout(toy_sites):
    """Patching stores W_down neuron-major ([D, d] contiguous, the parameter a transposed view)."""
    m = _Model()
    s = _stats_for(m)
    for mlp in m.mlps:
        w = mlp.down_proj.weight
        nm = w.detach().t().contiguous()  # [D, d] neuron-major storage
        mlp.down_proj.weight = torch.nn.Parameter(nm.t(), requires_grad=False)
        assert not mlp.down_proj.weight.is_contiguous()
    sig = stats_mod.model_signature(m)
    assert sig["fingerprint"] == s.meta["fingerprint"]
    s.check_model(m)


def test_fingerprint_accepts_same_weights_in_bf16(toy_sites):
    m = _Model()
    s = _stats_for(m)
    m.to(torch.bfloat16)
    s.check_model(m)  # same weights, lower-precision load: accepted
    m16 = _Model().to(torch.float16)
    s.check_model(m16)


def test_bare_stats_only_check_shapes(toy_sites):
    m = _Model(layers=2, D=40)
    GlobalStats([torch.ones(40)] * 2, [torch.ones(40)] * 2).check_model(m)
    with pytest.raises(StatsMismatchError, match="D \\(FFN size\\)"):
        GlobalStats([torch.ones(41)] * 2, [torch.ones(41)] * 2).check_model(m)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_real_registry_signature_survives_patching(family):
    """With the patch layer's registry: metadata from the handlers, and the fingerprint is the same
    before and after patching (W_down becomes neuron-major) and after unpatching."""
    import tiny_models
    import glass_kernels.patch as gp

    model = tiny_models.build(family)
    sites = gp.find_ffn_sites(model)
    sig = stats_mod.model_signature(model)
    assert sig["num_layers"] == len(sites) == tiny_models.LAYERS
    assert sig["d"] == [tiny_models.D_MODEL] * len(sites) and sig["D"] == [tiny_models.D_FF] * len(sites)
    s = GlobalStats.for_model(model, [torch.rand(n) for n in sig["D"]], [torch.rand(n) for n in sig["D"]])
    gp.patch(model, stats=s, method="a-glass", keep=0.5)
    try:
        assert stats_mod.model_signature(model)["fingerprint"] == sig["fingerprint"]
        s.check_model(model)
    finally:
        gp.unpatch(model)
    assert stats_mod.model_signature(model)["fingerprint"] == sig["fingerprint"]
    other = tiny_models.build(family, seed=1)
    with pytest.raises(StatsMismatchError, match="fingerprint"):
        s.check_model(other)
