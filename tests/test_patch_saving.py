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
