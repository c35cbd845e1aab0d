"""GlassConfig validation and patch()'s errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tiny_models as tm
from glass_kernels.patch import (
    GlassConfig,
    UnsupportedModelError,
    is_patched,
    patch,
    session,
    supported_classes,
    unpatch,
)


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.0001, 2, float("nan")])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        GlassConfig(keep=keep)


@pytest.mark.parametrize(
    "kw, exc, word",
    [
        (dict(keep="0.5"), TypeError, "keep"),
        (dict(keep=True), TypeError, "keep"),
        (dict(method="glass"), ValueError, "method"),
        (dict(lam=1.5), ValueError, "lam"),
        (dict(lam=-0.1), ValueError, "lam"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(seed=1.5), TypeError, "seed"),
    ],
)
def test_bad_fields(kw, exc, word):
    with pytest.raises(exc, match=word):
        GlassConfig(**kw)


def test_k_and_effective_lambda():
    c = GlassConfig(keep=0.5)
    assert (c.k_for(88), c.k_for(1), c.k_for(3)) == (44, 1, 1)
    assert GlassConfig(keep=1.0).k_for(88) == 88
    assert GlassConfig(keep=0.7).k_for(10) == 7  # 0.7 * 10 is 6.999... in binary
    assert GlassConfig(keep=1e-6).k_for(88) == 1
    assert GlassConfig(method="griffin", lam=0.6).effective_lam == 0.0
    assert GlassConfig(method="global", lam=0.6).effective_lam == 1.0
    assert GlassConfig(method="a-glass", lam=0.6).effective_lam == 0.6
    assert GlassConfig(method="i-glass").local_kind == "impact"
    with pytest.raises(TypeError, match="kep"):
        c.replace(kep=0.3)


def test_unsupported_model():
    with pytest.raises(UnsupportedModelError, match="LlamaMLP") as e:
        patch(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), method="griffin")
    for name in ("Phi3MLP", "OPTDecoderLayer", "GPT2MLP", "Gemma3MLP"):
        assert name in str(e.value) and name in supported_classes()
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        patch(tm.build("llama", mlp_bias=True), method="griffin")
    with pytest.raises(UnsupportedModelError, match="activation"):
        patch(tm.build("gpt2", activation_function="quick_gelu"), method="griffin")


def test_patch_arguments():
    model = tm.build("llama")
    with pytest.raises(TypeError, match="instance"):
        patch(type(model), method="griffin")
    with pytest.raises(TypeError, match="GlassConfig"):
        patch(model, config={"method": "griffin"})
    with pytest.raises(TypeError, match="unknown GlassConfig field"):
        patch(model, method="griffin", lamda=0.5)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        session(model)
    assert not is_patched(model)
    assert patch(model, GlassConfig(method="griffin"), keep=0.3) is model
    assert is_patched(model) and session(model).config.keep == 0.3
    with pytest.raises(RuntimeError, match="already patched"):
        patch(model, method="griffin")
    unpatch(model)
    assert not is_patched(model)


@pytest.mark.parametrize("method", ["a-glass", "i-glass", "global"])
def test_missing_stats(method):
    model = tm.build("llama")
    with pytest.raises(ValueError, match="calibrate") as e:
        patch(model, method=method)
    assert "python -m glass_kernels calibrate" in str(e.value)
    assert not is_patched(model)
    assert all(type(m).__name__ != "GlassFFN" for m in model.modules())
    with pytest.raises(ValueError, match="tokenizer"):
        patch(model, method=method, stats="calibrate")


def test_stats_of_another_model_rejected():
    a, b = tm.build("llama", seed=0), tm.build("llama", seed=1)
    stats = tm.random_stats(a)
    patch(a, stats=stats)  # its own model: fine
    unpatch(a)
    with pytest.raises(ValueError):
        patch(b, stats=stats)
    assert not is_patched(b)
    with pytest.raises(ValueError):
        patch(tm.build("gpt2"), stats=stats)


def test_failed_install_leaves_model_untouched(monkeypatch):
    from glass_kernels.ffn import families

    model = tm.build("llama")
    before = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    calls = []

    def boom(self, parent, attr, module, glass):
        calls.append(attr)
        if len(calls) == 2:
            raise RuntimeError("install failed")
        parent.__setattr__(attr, glass)

    monkeypatch.setattr(families.GatedMLPHandler, "install", boom)
    with pytest.raises(RuntimeError, match="install failed"):
        patch(model, method="griffin")
    assert "Glass" not in repr(model)
    after = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    assert {n: s for n, (_, s) in after.items()} == {n: s for n, (_, s) in before.items()}


def test_top_level_api():
    import glass_kernels
    import glass_kernels.patch as patch_pkg  # binds the package to glass_kernels.patch

    model = tm.build("llama")
    assert glass_kernels.patch(model, glass_kernels.GlassConfig(method="griffin"), keep=0.25) is model
    assert patch_pkg.is_patched(model) and glass_kernels.session(model).config.keep == 0.25
    glass_kernels.unpatch(model)
    assert not patch_pkg.is_patched(model)


class _Tok:
    """Duck-typed tokenizer (what calibrate's NPS source reads): BOS 1, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None


def test_stats_calibrate_now():
    from glass_kernels.calibrate import calibrate

    model = tm.build("gpt2")
    opts = dict(num_sequences=4, seq_len=24, batch_size=4, progress=False)
    patch(model, stats="calibrate", tokenizer=_Tok(), calibrate_options=opts, method="a-glass")
    got = session(model)._state.selection.global_ranks
    unpatch(model)
    want = calibrate(model, _Tok(), **opts).ranks("activation")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("first", ["from glass_kernels import patch",
                                   "import glass_kernels; glass_kernels.patch",
                                   "import glass_kernels.patch"])
def test_patch_package_is_the_same_in_any_import_order(first):
    """`import glass_kernels.patch as gp` gives the package (gp.session, gp.find_ffn_sites, ...) and
    glass_kernels.patch(model) patches, whichever import ran first (a fresh interpreter each)."""
    import subprocess
    import sys

    code = (f"{first}\nimport glass_kernels\nimport glass_kernels.patch as gp\n"
            "from glass_kernels import patch\n"
            "assert gp is patch is glass_kernels.patch, (gp, patch, glass_kernels.patch)\n"
            "assert callable(gp) and gp.session and gp.find_ffn_sites and gp.unpatch\n"
            "assert 'Patch ``model``' in (gp.__call__.__doc__ or '')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
