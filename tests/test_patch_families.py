"""patch() on a tiny random model of every family: sites, dense equivalence, masked-neuron
reference, unpatch, and the no-copy weight layout."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from glass_kernels.hf_compat import cache_kwargs, output_cache
from glass_kernels.patch import GlassFFN, find_ffn_sites, patch, session, unpatch

FAMILIES = tm.FAMILIES


def _ids(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, tm.VOCAB, (B, T), generator=g)


def _flow(model, prompt, cont, step):
    """Prompt (new sequence), a teacher-forced 3-token continuation, one decode token; all logits."""
    with torch.no_grad():
        a = model(prompt, use_cache=True)
        b = model(cont, **cache_kwargs(model, output_cache(a)), use_cache=True)
        c = model(step, **cache_kwargs(model, output_cache(b)), use_cache=True)
    return torch.cat([a.logits, b.logits, c.logits], dim=1)


def _masked_flow(model, sets, prompt, cont, step):
    """_flow on the unpatched ``model`` with only ``sets`` active after the prompt (NeuronMask): the
    reference a patched model's _flow must match."""
    with tm.NeuronMask(model, sets) as nm:
        with torch.no_grad():
            a = model(prompt, use_cache=True)
            nm.active = True
            b = model(cont, **cache_kwargs(model, output_cache(a)), use_cache=True)
            c = model(step, **cache_kwargs(model, output_cache(b)), use_cache=True)
    return torch.cat([a.logits, b.logits, c.logits], dim=1)


def _inputs(B=2):
    return _ids(1, B, 7), _ids(2, B, 3), _ids(3, B, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_sites(family):
    model = tm.build(family)
    sites = find_ffn_sites(model)
    assert len(sites) == tm.LAYERS
    assert [s.layer for s in sites] == list(range(tm.LAYERS))
    for s in sites:
        assert type(s.module).__name__ == tm.FFN_CLASS[family]
        assert (s.d, s.D, s.activation) == (tm.D_MODEL, tm.D_FF, tm.ACTIVATION[family])
        assert tuple(s.handler.down_weight(s.module).shape) == (tm.D_MODEL, tm.D_FF)
        assert model.get_submodule(s.name) is s.module
    # intermediate_module's first input really is h [..., D]
    seen = []
    hook = sites[0].handler.intermediate_module(sites[0].module).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape[-1]))
    with torch.no_grad():
        model(_ids(0, 1, 4))
    hook.remove()
    assert seen == [tm.D_FF]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_one_gives_dense_logits(family):
    prompt, cont, step = _inputs()
    oracle = _flow(tm.build(family, dtype=torch.float64), prompt, cont, step)
    model = tm.build(family)
    dense = _flow(model, prompt, cont, step)
    patch(model, method="griffin", keep=1.0)
    got = _flow(model, prompt, cont, step)
    assert session(model).phase == "decode"
    assert all(t.shape == (2, tm.D_FF) for t in session(model).neurons())
    tm.assert_close_to_oracle(got, dense, oracle, family)
    # the prompt itself runs the family's own dense code
    assert torch.equal(got[:, :7], dense[:, :7])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["griffin", "a-glass"])
def test_sparse_matches_masked_reference(family, method):
    prompt, cont, step = _inputs()
    model = tm.build(family)
    stats = tm.random_stats(model) if method == "a-glass" else None
    patch(model, stats=stats, method=method, keep=0.4)
    got = _flow(model, prompt, cont, step)
    sets = session(model).neurons()
    k = int(0.4 * tm.D_FF)
    assert all(s.shape == (2, k) and s.dtype == torch.int32 for s in sets)
    assert not torch.equal(sets[0][0], sets[0][1]), "two different prompts should get different sets"
    unpatch(model)

    ref = _masked_flow(model, sets, prompt, cont, step)
    oracle = _masked_flow(tm.build(family, dtype=torch.float64), sets, prompt, cont, step)
    tm.assert_close_to_oracle(got, ref, oracle, f"{family}/{method}")
    # sparsity really changed the output (the test would be vacuous otherwise)
    assert (ref[:, 7:] - _flow(model, prompt, cont, step)[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "phi3", "opt", "gpt2"])
def test_sparse_bf16(family):
    prompt, cont, step = _inputs()
    model = tm.build(family, dtype=torch.bfloat16)
    patch(model, method="griffin", keep=0.5)
    got = _flow(model, prompt, cont, step)
    sets = session(model).neurons()
    unpatch(model)

    # Only the decode positions: the prompt's h (hence the sets) can differ from fp64's.
    ref = _masked_flow(model, sets, prompt, cont, step)[:, 7:]
    oracle = _masked_flow(tm.build(family, dtype=torch.float64), sets, prompt, cont, step)[:, 7:]
    tm.assert_close_to_oracle(got[:, 7:], ref, oracle, f"{family}/bf16")


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_bit_identical(family):
    model = tm.build(family)
    prompt, cont, step = _inputs()
    before = _flow(model, prompt, cont, step)
    params = {n: (p.detach().clone(), p.stride(), p) for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    patch(model, method="griffin", keep=0.3)
    _flow(model, prompt, cont, step)
    assert "GlassFFN" in repr(model) and "method=griffin" in repr(model)
    unpatch(model)
    assert "Glass" not in repr(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    for n, p in model.named_parameters():
        v, stride, obj = params[n]
        assert p is obj and p.stride() == stride and p.is_contiguous() and torch.equal(p, v), n
    assert torch.equal(_flow(model, prompt, cont, step), before)


def _storages(model):
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_not_doubled(family):
    model = tm.build(family)
    keys = list(model.state_dict())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    nbytes = sum(_storages(model).values())
    patch(model, method="griffin", keep=0.5)
    assert list(model.state_dict()) == keys  # names unchanged: save/load keep working
    assert sum(_storages(model).values()) == nbytes  # no extra weight storage
    glass = [m for m in model.modules() if isinstance(m, GlassFFN)]
    assert len(glass) == tm.LAYERS
    with torch.no_grad():
        model(_ids(0, 1, 4), use_cache=True)  # a prompt, so that the decode operands get prepared
    st = glass[0].state
    st.select()
    relaid = 0
    for site, (fn, operands, idx, act) in zip(st.sites, st.plan.calls):
        for t in operands:
            if t is None:
                continue
            assert t.is_contiguous()
            # every operand is a view of a model parameter's storage
            assert any(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                       for p in model.parameters())
        w = site.handler.down_weight(site.module)
        assert w.t().is_contiguous()  # neuron-major storage, parameter is its view
    for n, p in model.named_parameters():
        if p.data_ptr() != ptrs[n]:
            relaid += 1
            assert p.t().is_contiguous(), n
    assert relaid == tm.LAYERS  # exactly one matrix per layer changed layout (W_down / c_fc / fc2)
