"""The schedule's pieces on their own: Selection (selection.py) and DecodePlan (plan.py)."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from glass_kernels import ops
from glass_kernels.patch import GlassConfig, find_ffn_sites
from glass_kernels.patch.plan import DecodePlan
from glass_kernels.patch.selection import FixedSelection, NoSelection, RankAggregation, make_selection

K = tm.D_FF // 2


def _setup(method, **kw):
    model = tm.build("llama")
    sites = find_ffn_sites(model)
    config = GlassConfig(method=method, keep=0.5, **kw)
    return model, sites, make_selection(config, [s.D for s in sites], [K] * len(sites), tm.random_stats(model))


@pytest.mark.parametrize("method,cls", [("a-glass", RankAggregation), ("i-glass", RankAggregation),
                                        ("griffin", RankAggregation), ("global", FixedSelection),
                                        ("random", FixedSelection), ("dense", NoSelection)])
def test_each_method_has_its_selection(method, cls):
    _, _, sel = _setup(method)
    assert type(sel) is cls and sel.needs_local == (cls is RankAggregation)


def test_rank_aggregation_is_select_neurons_per_layer():
    model, sites, sel = _setup("a-glass", lam=0.3)
    g = torch.Generator().manual_seed(0)
    local = [torch.rand(2, s.D, generator=g) for s in sites]
    got = sel.choose(local, lambda l: torch.device("cpu"))
    ranks = tm.random_stats(model).ranks("activation")
    for l, s in enumerate(got):
        assert s.shape == (2, K) and s.dtype == torch.int32
        assert torch.equal(s, ops.select_neurons(local[l], ranks[l].to(torch.int32), 0.3, K))
    assert sel.nbytes()["global_ranks"] == sum(r.numel() * 4 for r in ranks)


def test_fixed_random_sets_are_seeded_sorted_and_shared():
    _, _, a = _setup("random", seed=3)
    _, _, b = _setup("random", seed=3)
    sa, sb = a.choose(None, lambda l: torch.device("cpu")), b.choose(None, lambda l: torch.device("cpu"))
    assert all(torch.equal(x, y) and x.shape == (1, K) and bool((x[0, 1:] > x[0, :-1]).all())
               for x, y in zip(sa, sb))
    assert a.nbytes()["fixed_sets"] == sum(t.numel() * 4 for t in sa)


@pytest.mark.parametrize("compact", [False, True])
def test_decode_plan_runs_the_sparse_op(compact):
    model, sites, _ = _setup("griffin")
    g = torch.Generator().manual_seed(1)
    sets = [torch.randperm(s.D, generator=g)[:K].sort().values.to(torch.int32).reshape(1, K) for s in sites]
    from glass_kernels.patch import patch, unpatch

    patch(model, method="griffin", keep=0.5, tune=False)  # neuron-major W_down, as the plan expects
    try:
        plan = DecodePlan(sites, sets, compact)
        assert plan.strategy == ("compact" if compact else "gather")
        assert (plan.copy_nbytes() > 0) == compact
        x = torch.randn(1, 1, tm.D_MODEL, generator=g)
        for l, site in enumerate(sites):
            wg, wu, wdt = site.handler.weights(site.module)
            want = ops.sparse_ffn(x, wg, wu, wdt, sets[l][0], "silu")
            assert torch.equal(plan.forward(l, x, 1, False), want)
    finally:
        unpatch(model)
