"""Triton sparse_ffn_q / sparse_mlp_q (quantized rows, dequantized as they load) against an fp64 oracle
of the dequantized weights, with torch's own error in the activation dtype as the tolerance.

Small shapes (each interpreted launch costs tens to hundreds of ms on CPU): d = 96 spans three
32-value blocks and, with the interpreter's BLOCK_D of 32, three chunks; T = 17 takes the tl.dot path.
"""

import pytest
import torch

import oracles
from glass_kernels import quant
from glass_kernels.triton import sparse_ffn_q as triton_sparse_ffn_q
from glass_kernels.triton import sparse_mlp_q as triton_sparse_mlp_q


def _quantized(n, D, d, wtype, gen, device):
    ws = [torch.randn(D, d, generator=gen) / d ** 0.5 for _ in range(n)]
    qs = [quant.quantize(w, wtype) for w in ws]
    return [q.to(device) for q in qs], [quant.dequantize(q, wtype).to(device) for q in qs]


def _idx(B, D, k, batched, gen, device):
    rows = [torch.randperm(D, generator=gen)[:k].sort().values for _ in range(B if batched else 1)]
    return (torch.stack(rows) if batched else rows[0]).to(torch.int32).to(device)


# (B, T, d, D, k, idx batched): decode (T = 1, k = D and k = 1), per-sequence sets, the tl.dot tile
CASES = [(1, 1, 96, 40, 40, False), (1, 1, 64, 40, 1, False), (2, 3, 96, 33, 7, True), (1, 17, 32, 24, 13, False)]


@pytest.mark.parametrize("wtype", quant.QTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}d{}D{}k{}{}".format(*c[:5], "b" if c[5] else ""))
def test_sparse_ffn_q_matches_oracle(case, dtype, wtype, device):
    B, T, d, D, k, batched = case
    gen = torch.Generator().manual_seed(3000 + d + k)
    x = torch.randn(B, T, d, generator=gen).to(dtype).to(device)
    (qg, qu, qd), (wg, wu, wd) = _quantized(3, D, d, wtype, gen, device)
    idx = _idx(B, D, k, batched, gen, device)
    y = triton_sparse_ffn_q(x, qg, qu, qd, idx, "silu", wtype)
    assert y.dtype == dtype and y.shape == x.shape
    oracle = oracles.ffn(x, wg, wu, wd, None, None, idx, "silu", torch.float64)
    native = oracles.ffn(x, wg, wu, wd, None, None, idx, "silu", dtype)
    oracles.check(y, oracle, native, f"sparse_ffn_q {wtype} {case} {dtype}")


@pytest.mark.parametrize("wtype", quant.QTYPES)
def test_sparse_mlp_q_and_bundled_rows(wtype, device):
    """Non-gated with biases, through the ops layer with the triton backend; quantized rows as views
    of one neuron-bundled block (row stride in bytes) give the same bits as separate tensors."""
    import glass_kernels

    gen = torch.Generator().manual_seed(41)
    B, T, d, D, k = 2, 2, 64, 30, 9
    (qi, qo), (wi, wo) = _quantized(2, D, d, wtype, gen, device)
    b_in, b_out = torch.randn(D, generator=gen).to(device), torch.randn(d, generator=gen).to(device)
    x = torch.randn(B, T, d, generator=gen).to(device)
    idx = _idx(B, D, k, True, gen, device)
    y = triton_sparse_mlp_q(x, qi, b_in, qo, b_out, idx, "gelu", wtype)
    oracle = oracles.ffn(x, wi, None, wo, b_in, b_out, idx, "gelu", torch.float64)
    oracles.check(y, oracle, oracles.ffn(x, wi, None, wo, b_in, b_out, idx, "gelu", torch.float32), "sparse_mlp_q")
    with glass_kernels.backend("triton"):
        assert torch.equal(quant.sparse_mlp_q(x, qi, b_in, qo, b_out, idx, "gelu", wtype), y)
    block = torch.stack([qi, qo], dim=1)  # [D, 2, row_bytes]
    views = [block[:, j] for j in range(2)]
    assert torch.equal(triton_sparse_mlp_q(x, views[0], b_in, views[1], b_out, idx, "gelu", wtype), y)
