"""The transformers details the patch relies on (glass_kernels.hf_compat), checked against the
installed release, and the "never silent" promise: generate() on every family really runs the
sparse kernel after the prompt, and a cache the schedule cannot find is reported, not ignored.

CI runs this file with the lowest supported transformers and with the newest one pip serves."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from glass_kernels import hf_compat, ops
from glass_kernels.patch import patch, session, unpatch

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 6


def _ids(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, tm.VOCAB, (B, T), generator=g)


def _ours(caplog) -> list[str]:
    """Messages glass_kernels logged (transformers' own warnings differ between releases)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("glass_kernels")]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the sparse kernels that the decode path runs (patch after this fixture)."""
    calls = {"n": 0}
    for name in ("sparse_ffn_prevalidated", "sparse_mlp_prevalidated"):
        real = getattr(ops, name)

        def counting(*args, _real=real, **kwargs):
            calls["n"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counting)
    return calls


# -- what the installed transformers provides ---------------------------------------------------

def test_pyproject_floor_is_the_compat_floor():
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"transformers>=([0-9.]+)', text)
    assert m, "pyproject.toml's hf extra must declare a transformers floor"
    assert m.group(1) == hf_compat.MIN_TRANSFORMERS


def test_installed_transformers_is_supported():
    v = hf_compat.transformers_version()
    assert v is not None
    hf_compat.check_transformers()  # raises below the floor


def test_check_transformers_rejects_old_releases(monkeypatch):
    monkeypatch.setattr(hf_compat, "transformers_version", lambda: "4.57.6")
    with pytest.raises(RuntimeError, match=r"transformers >= 5\.0\.0 \(installed: 4\.57\.6\)"):
        hf_compat.check_transformers()
    model = tm.build("llama")
    with pytest.raises(RuntimeError, match="needs transformers"):
        patch(model, method="griffin")


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_forward_declares_a_known_cache_argument(family):
    model = tm.build(family)
    assert hf_compat.cache_arg_name(model.forward) in hf_compat.CACHE_ARG_NAMES
    assert hf_compat.prefill_methods(model) == list(hf_compat.PREFILL_METHODS)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_output_cache_and_cache_kwargs_round_trip(family):
    model = tm.build(family)
    ids = _ids(1, 2, 5)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = hf_compat.output_cache(out)
        assert hf_compat.is_cache(cache) and hf_compat.cache_length(cache) == 5
        out2 = model(ids[:, :1], **hf_compat.cache_kwargs(model, cache), use_cache=True)
    assert hf_compat.cache_length(hf_compat.output_cache(out2)) == 6


def test_find_cache_by_keyword_and_position():
    marker = object()
    for name in hf_compat.CACHE_ARG_NAMES:
        assert hf_compat.find_cache((), {name: marker}, None) == (True, marker)
    assert hf_compat.find_cache((1, 2, 3, marker), {}, 3) == (True, marker)
    assert hf_compat.find_cache((1, 2), {}, 3) == (False, None)
    assert hf_compat.cache_length(None) == 0


# -- never silent: counted sparse decode steps --------------------------------------------------

def _generate(model, **kw):
    ids = _ids(7, 2, 5)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_generate_runs_the_sparse_kernel_every_decode_step(family, kernel_calls, caplog):
    model = tm.build(family)
    patch(model, stats=tm.random_stats(model), method="a-glass", keep=0.5)
    with caplog.at_level(logging.WARNING, logger="glass_kernels.patch"):
        _generate(model)
    # one prompt forward, then NEW_TOKENS - 1 decode forwards, each one kernel call per layer
    assert session(model).counters() == {"prompt": 1, "sparse": NEW_TOKENS - 1, "dense": 0}
    assert kernel_calls["n"] == (NEW_TOKENS - 1) * tm.LAYERS
    assert session(model).decode_summary() == f"{NEW_TOKENS - 1} of {NEW_TOKENS - 1} decode steps ran sparse"
    assert not _ours(caplog)
    unpatch(model)


def test_keep_one_says_every_layer_ran_its_dense_forward(kernel_calls):
    # keep 1.0 keeps every neuron: each layer runs its own dense forward (the dense result exactly), and
    # the summary says so instead of letting "ran sparse" suggest the kernel ran
    model = tm.build("llama")
    patch(model, stats=tm.random_stats(model), method="a-glass", keep=1.0)
    _generate(model)
    assert session(model).counters()["sparse"] == NEW_TOKENS - 1
    assert kernel_calls["n"] == 0
    assert session(model).kernel_layers() == (0, tm.LAYERS)
    assert session(model).decode_summary() == (f"{NEW_TOKENS - 1} of {NEW_TOKENS - 1} decode steps ran sparse (every "
                                               "layer keeps all its neurons: each ran its dense forward)")
    unpatch(model)
    patch(model, stats=tm.random_stats(model), method="a-glass", keep=0.5)
    assert session(model).kernel_layers() is None  # no selection yet
    _generate(model)
    assert session(model).kernel_layers() == (tm.LAYERS, tm.LAYERS)
    unpatch(model)


def test_cache_passed_positionally_is_found(kernel_calls):
    model = tm.build("llama")
    name = hf_compat.cache_arg_name(model.forward)
    params = list(inspect.signature(model.forward).parameters)
    pos = params.index(name)
    patch(model, method="griffin", keep=0.5)
    ids = _ids(3, 1, 4)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        args = [ids[:, :1]] + [None] * (pos - 1) + [hf_compat.output_cache(out)]
        model(*args)
    assert session(model).counters() == {"prompt": 1, "sparse": 1, "dense": 0}
    assert kernel_calls["n"] == tm.LAYERS


def test_hidden_cache_warns_and_counts_dense_steps(monkeypatch, kernel_calls, caplog):
    """A broken cache detection (as a transformers rename would cause) is reported."""
    model = tm.build("llama")
    patch(model, method="griffin", keep=0.5)
    monkeypatch.setattr(hf_compat, "find_cache", lambda args, kwargs, position: (False, None))
    monkeypatch.setattr(hf_compat, "stray_cache", lambda kwargs: None)
    with caplog.at_level(logging.WARNING, logger="glass_kernels.patch"):
        _generate(model)
        _generate(model)
    warnings = _ours(caplog)
    assert len(warnings) == 1, warnings  # once per patched model, not at every step
    assert "a decode step of generate() ran dense" in warnings[0]
    assert "KV cache was not found" in warnings[0]
    assert session(model).counters()["dense"] == 2 * (NEW_TOKENS - 1)
    assert session(model).counters()["sparse"] == 0 and kernel_calls["n"] == 0


def test_cache_under_an_unknown_name_is_used_and_reported(monkeypatch, kernel_calls, caplog):
    model = tm.build("llama")
    real_name = hf_compat.cache_arg_name(model.forward)
    # as if transformers had renamed the argument to a name this module does not list yet
    monkeypatch.setattr(hf_compat, "CACHE_ARG_NAMES", ("renamed_cache",))
    patch(model, method="griffin", keep=0.5)
    ids = _ids(3, 1, 4)
    with caplog.at_level(logging.WARNING, logger="glass_kernels.patch"), torch.no_grad():
        out = model(ids, use_cache=True)
        model(ids[:, :1], **{real_name: hf_compat.output_cache(out)}, use_cache=True)
    assert any("a name that glass_kernels.hf_compat.CACHE_ARG_NAMES does not list" in m for m in _ours(caplog))
    assert session(model).counters() == {"prompt": 1, "sparse": 1, "dense": 0}


def test_generate_without_cache_warns(caplog):
    model = tm.build("qwen2")
    patch(model, method="griffin", keep=0.5)
    with caplog.at_level(logging.WARNING, logger="glass_kernels.patch"):
        _generate(model, use_cache=False)
    assert any("use_cache=False" in m for m in _ours(caplog))
    assert session(model).counters() == {"prompt": 1, "sparse": 0, "dense": NEW_TOKENS - 1}


@pytest.mark.parametrize("kw", [dict(method="dense"), dict(method="griffin", keep=1.0)])
def test_expected_dense_or_full_decode_does_not_warn(kw, caplog):
    model = tm.build("gemma3")
    patch(model, **kw)
    with caplog.at_level(logging.WARNING, logger="glass_kernels.patch"):
        _generate(model)
    assert not _ours(caplog)
    c = session(model).counters()
    expect = "dense" if kw["method"] == "dense" else "sparse"
    assert c[expect] == NEW_TOKENS - 1 and c["prompt"] == 1
    session(model).reset_counters()
    assert session(model).counters() == {"prompt": 0, "sparse": 0, "dense": 0}


def test_unpatch_removes_the_generate_wrappers():
    model = tm.build("llama")
    patch(model, method="griffin")
    assert "generate" in model.__dict__ and "_prefill" in model.__dict__
    unpatch(model)
    assert "generate" not in model.__dict__ and "_prefill" not in model.__dict__
