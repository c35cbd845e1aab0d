"""state_dict() / save_pretrained() of a patched model: an ordinary checkpoint of the original
architecture (FFN weights in their original layout, dequantized where patch quantized them), and
the patched model keeps decoding as before."""

from __future__ import annotations

import pytest
import torch
import transformers

from glass_kernels import patch, unpatch
from glass_kernels.ffn import find_ffn_sites

import tiny_models as tm

IDS = torch.tensor([[5, 9, 17, 3, 8]])


def _build(family):
    return tm.build(family, **tm.width_overrides(family, 64))  # d % 32 == 0 for quantized rows


def _generate(model):
    with torch.no_grad():
        return model.generate(IDS, max_new_tokens=4, do_sample=False)


def _saved_and_loaded(model, tmp_path):
    model.save_pretrained(tmp_path)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()


@pytest.mark.parametrize("layout", ["separate", "bundled"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_patched_model_saves_its_original_weights(family, layout, tmp_path):
    model = _build(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    patch(model, method="griffin", keep=0.5, layout=layout, tune=False)
    assert any(not p.is_contiguous() for s in find_ffn_sites(model) for p in s.handler.weight_params(s.module)), \
        "the patch should leave strided views here, or this test checks nothing"
    before = _generate(model)
    loaded = _saved_and_loaded(model, tmp_path)
    assert loaded.keys() >= original.keys() - {k for k in original if "lm_head" in k}
    for k, v in loaded.items():
        assert torch.equal(v, original[k]), k
    assert torch.equal(_generate(model), before)  # saving changed nothing in the patched model


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_model_with_quantized_rows_saves_the_dequantized_weights(family, weights, tmp_path):
    model = _build(family)
    patch(model, method="griffin", keep=0.5, weights=weights, tune=False)
    before = _generate(model)
    loaded = _saved_and_loaded(model, tmp_path)
    assert torch.equal(_generate(model), before)
    released = [p for s in find_ffn_sites(model) for p in s.handler.weight_params(s.module)]
    assert all(p.numel() == 0 for p in released)  # still only the quantized rows are held
    unpatch(model)  # unpatch leaves the dequantized weights: what the saved file must hold
    for k, v in model.state_dict().items():
        if k in loaded:
            assert torch.equal(loaded[k], v), k
    assert all(loaded[k].numel() > 0 for k in loaded)


def test_unpatch_removes_the_hook():
    model = _build("llama")
    patch(model, method="griffin", keep=0.5, tune=False)
    unpatch(model)
    gate = find_ffn_sites(model)[0].module.gate_proj.weight
    gate.data = gate.data.t().contiguous().t()  # the same values in a strided view
    assert not model.state_dict()["model.layers.0.mlp.gate_proj.weight"].is_contiguous()  # passed through


# ---- load_state_dict: refused where the patch derived something from the FFN weights ------------

def _checkpoint(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_loading_ffn_weights_into_quantized_rows_is_refused_clearly(weights):
    model = _build("llama")
    sd = _checkpoint(model)
    patch(model, method="griffin", keep=0.5, weights=weights, tune=False)
    before = _generate(model)
    with pytest.raises(RuntimeError, match=r"quantized rows .*Unpatch first"):
        model.load_state_dict(sd)
    assert torch.equal(_generate(model), before)  # refused before anything was copied
    ffn = {k for k in sd if ".mlp." in k}
    model.load_state_dict({k: v for k, v in sd.items() if k not in ffn}, strict=False)  # other weights load
    unpatch(model)
    model.load_state_dict(sd)  # unpatched: an ordinary load again
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])


def test_loading_ffn_weights_under_global_statistics_is_refused():
    model = _build("llama")
    sd = _checkpoint(model)
    patch(model, method="a-glass", keep=0.5, stats=tm.random_stats(model), tune=False)
    with pytest.raises(RuntimeError, match=r"global statistics .*statistics of the new weights"):
        model.load_state_dict(sd)


@pytest.mark.parametrize("layout", ["separate", "bundled"])
def test_float_rows_without_statistics_load_new_weights_into_the_patched_views(layout):
    """GRIFFIN selects from the prompt alone: nothing goes stale, and the loaded values land in
    the storage the decode kernel reads (the relaid / bundled views)."""
    model = _build("llama")
    patch(model, method="griffin", keep=1.0, layout=layout, tune=False)
    other = _build("llama")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with torch.no_grad():
        old_logits = model(IDS).logits
        model.load_state_dict(_checkpoint(other))
        new_logits, expected = model(IDS).logits, other(IDS).logits
    assert not torch.allclose(old_logits, expected, atol=1e-4)  # the new weights make a difference...
    torch.testing.assert_close(new_logits, expected)  # ...and the patched model computes with them
    assert torch.equal(_generate(model), _generate(other))  # decode steps too (keep 1.0: every neuron)
