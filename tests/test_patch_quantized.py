"""patch(model, weights="int8" | "int4"): the FFN held as quantized neuron rows while patched."""

from __future__ import annotations

import pytest
import torch

from glass_kernels import hf_compat, patch, quant, session, unpatch
from glass_kernels.ffn import find_ffn_sites, is_patched

import tiny_models as tm

IDS, NEXT = torch.tensor([[5, 9, 17, 3, 8]]), torch.tensor([[11]])


def _build(family, dtype=torch.float32):
    return tm.build(family, dtype=dtype, **tm.width_overrides(family, 64))  # d % 32 == 0


def _snapshot(model):
    return {k: (v.clone(), v.stride(), v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_keep_one_decodes_what_the_dequantized_dense_model_decodes(family, weights):
    model = _build(family)
    before = _snapshot(model)
    patch(model, method="griffin", keep=1.0, weights=weights, tune=False)
    with torch.no_grad():
        got = model.generate(IDS, max_new_tokens=6, do_sample=False)
    assert session(model).counters()["sparse"] == 5
    assert session(model).memory_overhead()["quantized_rows"] > 0
    unpatch(model)
    # unpatch leaves the dequantized weights, in the original shapes, strides and dtypes: the dense
    # model on those weights is what the quantized model computed
    after = model.state_dict()
    assert all(after[k].stride() == s and after[k].dtype == dt and after[k].shape == v.shape
               for k, (v, s, dt) in before.items())
    with torch.no_grad():
        want = model.generate(IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("weights,wtype", [("int8", "q8_0"), ("int4", "q4_0")])
def test_unpatch_leaves_exactly_the_dequantized_weights(weights, wtype):
    model = _build("llama")
    site = find_ffn_sites(model)[0]
    gate = site.module.gate_proj.weight.detach().clone()
    patch(model, method="griffin", keep=0.5, weights=weights, tune=False)
    unpatch(model)
    assert torch.equal(site.module.gate_proj.weight, quant.dequantize(quant.quantize(gate, wtype), wtype))


def test_sparse_decode_matches_the_float_kernel_on_dequantized_weights():
    """keep 0.5: the quantized kernel against the float kernel reading the same (dequantized)
    weights, with the same neuron sets: equal up to fp32 summation order."""
    model = _build("qwen3")
    patch(model, method="griffin", keep=0.5, weights="int8", tune=False)
    with torch.no_grad():
        out = model(IDS, use_cache=True)
        sets = session(model).neurons()
        q_logits = model(NEXT, **hf_compat.cache_kwargs(model, hf_compat.output_cache(out))).logits
    unpatch(model)  # now the model holds the dequantized weights as floats
    patch(model, method="griffin", keep=0.5, tune=False)
    with torch.no_grad():
        out = model(IDS, use_cache=True)
        session(model).set_neurons(sets)
        f_logits = model(NEXT, **hf_compat.cache_kwargs(model, hf_compat.output_cache(out))).logits
    unpatch(model)
    torch.testing.assert_close(q_logits, f_logits, rtol=1e-4, atol=1e-4)


def test_bf16_model_with_int4_rows():
    model = _build("gemma3", torch.bfloat16)
    patch(model, method="griffin", keep=0.5, weights="int4", tune=False)
    with torch.no_grad():
        out = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and session(model).counters()["sparse"] == 3
    unpatch(model)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_released_parameters_cannot_be_used_silently():
    model = _build("llama")
    patch(model, method="griffin", keep=0.5, weights="int8", tune=False)
    mlp = find_ffn_sites(model)[0].module
    assert mlp.gate_proj.weight.numel() == 0  # released: only the quantized rows hold the FFN
    with pytest.raises(RuntimeError):
        mlp(torch.randn(1, 2, 64))  # the original module no longer computes anything
    unpatch(model)
    assert mlp.gate_proj.weight.shape == (tm.D_FF, 64)


def test_width_not_a_multiple_of_32_is_refused_and_nothing_changes():
    model = tm.build("llama")  # d = 40
    before = _snapshot(model)
    with pytest.raises(ValueError, match="multiple of 32.*d = 40"):
        patch(model, method="griffin", keep=0.5, weights="int8", tune=False)
    assert not is_patched(model)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) and now[k].stride() == s for k, (v, s, _) in before.items())


def test_weights_argument_is_checked():
    from glass_kernels import GlassConfig

    with pytest.raises(ValueError, match="weights must be one of"):
        GlassConfig(weights="int3")


def test_a_batch_of_prompts_gets_per_sequence_sets():
    model = _build("llama")
    patch(model, method="griffin", keep=0.5, weights="int8", tune=False)
    ids = torch.tensor([[5, 9, 17, 3], [7, 8, 30, 2], [4, 4, 4, 4]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (3, 7) and session(model).neurons()[0].shape[0] == 3
    assert session(model).counters()["sparse"] == 2
    unpatch(model)


def test_quantized_rows_share_one_allocation_and_unpatch_packs_each_layer(monkeypatch):
    """Every layer's quantized block is a slice of one huge-page-advised allocation (a small model's
    2.7 MiB blocks would each end in a partial huge page); unpatch gives each layer's dequantized
    weights one advised allocation, as the float path does."""
    from glass_kernels.ffn import layout

    calls = []
    monkeypatch.setattr(layout, "_libc_madvise", lambda: (lambda a, n, adv: calls.append((a, n)) or 0))
    model = tm.build("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=2)
    patch(model, method="griffin", keep=0.5, weights="int8", tune=False)
    from glass_kernels.ffn.registry import PATCH_ATTR

    quantized = model.__dict__[PATCH_ATTR].state.quantized
    assert len({r.untyped_storage().data_ptr() for q in quantized for r in q.rows}) == 1
    assert all(q.rows[0].data_ptr() % 64 == 0 for q in quantized)  # each layer's block
    assert [a for a, _ in calls].count(quantized[0].rows[0].data_ptr()) == 1  # advised from its start
    calls.clear()
    unpatch(model)
    for layer in model.model.layers:
        ws = [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]
        assert len({w.untyped_storage().data_ptr() for w in ws}) == 1
    assert len(calls) == 2
