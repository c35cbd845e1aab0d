"""torch.compile(fullgraph=True) traces the public ops (their fake implementations) and gives the
same results as eager. backend="aot_eager" exercises what matters here (dynamo tracing through the
wrappers, the fake implementations, functionalization of the accumulating op) without inductor's
C++ compile, which took 17 s for one small graph on this 2-core machine. The wrappers' value checks are skipped while tracing; the ops check values
at run time, so a bad idx still raises under compile."""

from __future__ import annotations

import pytest
import torch

import glass_kernels
from glass_kernels import ops


def _decode_step(x, wg, wu, wd, idx, h, dn, mask, acc, local, grank):
    # the shapes of one prompt's work: stats (functional and accumulating), selection, sparse FFN
    s = ops.neuron_stats(h, dn, mask)
    ops.neuron_stats(h, None, mask, out=acc)
    sel = ops.select_neurons(local + s, grank, 0.25, 9)
    y = ops.sparse_ffn(x, wg, wu, wd, idx, "silu")
    y2 = ops.sparse_mlp(x, wg, None, wd, None, idx.long(), "gelu")
    return y * 2 + y2, s, sel


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    D, d, B = 33, 16, 2
    wg, wu, wd = [torch.randn(D, d, generator=g) / 4 for _ in range(3)]
    x = torch.randn(B, 1, d, generator=g)
    idx = torch.stack([torch.randperm(D, generator=g)[:11] for _ in range(B)]).to(torch.int32)
    h = torch.randn(B, 5, D, generator=g)
    dn = torch.rand(D, generator=g) + 0.5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    local = torch.randn(B, D, generator=g)
    grank = torch.randperm(D, generator=g) + 1
    return [x, wg, wu, wd, idx, h, dn, mask, torch.zeros(B, D), local, grank]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    with glass_kernels.backend(backend):
        eager_in = _inputs()
        eager = _decode_step(*eager_in)
        compiled_in = _inputs()
        fn = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
        got = fn(*compiled_in)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)  # same kernels on the same inputs: bitwise the same
    assert torch.equal(eager_in[8], compiled_in[8])  # the accumulating op mutated acc under compile


def test_compile_checks_idx_at_run_time():
    torch._dynamo.reset()
    x, wg, wu, wd, idx = _inputs(2)[:5]
    fn = torch.compile(lambda x, i: ops.sparse_ffn(x, wg, wu, wd, i), fullgraph=True, backend="aot_eager")
    fn(x, idx)
    bad = idx.clone()
    bad[1, 3] = wg.shape[0]
    with pytest.raises(IndexError, match="idx values"):
        fn(x, bad)


def test_compile_prevalidated_path():
    torch._dynamo.reset()
    x, wg, wu, wd, idx = _inputs(3)[:5]
    idx32 = ops.validate_sparse_ffn_operands(wg, wu, wd, idx, "silu")
    fn = torch.compile(lambda x: ops.sparse_ffn_prevalidated(x, wg, wu, wd, idx32, "silu"), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(x), ops.sparse_ffn_prevalidated(x, wg, wu, wd, idx32, "silu"))
