"""Rank-aggregation neuron selection (docs/method.md), exact on the GPU.

r^L(i): rank of local[b, i] by descending score, ties -> lower index (1 = best);
a(i) = lam * r^G(i) + (1 - lam) * r^L(i) in float64, computed in that order without FMA;
keep the k smallest a(i), ties -> better r^L, then lower index; output sorted ascending, int32.

Design (the result must be bit-identical to the reference, ties included):
- Local ranks: ``torch.sort(local, descending=True, stable=True)`` on the device. Its
  permutation ``order`` lists the neurons by local rank, and a stable sort keeps equal scores in
  index order, which is exactly the tie rule. A Triton sort of D = 8K-32K keys per row is not
  worth writing (tl.sort sorts a power-of-two block held in registers) and this runs once per
  prompt.
- Aggregation: ``_select_neurons_kernel`` computes a(i) in float64 directly in local-rank order
  (position j holds neuron order[j], whose r^L is j + 1, so no scatter of ranks is needed). Each
  product is an explicit fma(., ., +0.0), i.e. exactly rounded, so no compiler setting can contract
  lam * r^G + (...) into one FMA (a single rounding differs from the reference's two and changes
  the selected set at some k); a launch option (enable_fp_fusion=False) would not survive
  torch.compile, which re-launches user kernels with its own options. lam and 1 - lam are computed
  on the host in float64 and passed in a float64 tensor because Triton passes Python floats as fp32.
- Top-k: a stable ascending sort of a, whose input is already in r^L order, so equal a(i) come out
  by better r^L (r^L is a permutation, so the index tie-break is never needed). torch.topk gives no
  tie guarantee, hence a sort. The first k positions map back through ``order`` and are sorted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glass_kernels.triton._utils import cdiv, interpreting, launch


@triton.jit
def _select_neurons_kernel(order_ptr, grank_ptr, coef_ptr, a_ptr, D, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    row = b.to(tl.int64) * D
    neuron = tl.load(order_ptr + row + offs, mask=m, other=0)
    r_g = tl.load(grank_ptr + neuron, mask=m, other=0).to(tl.float64)
    r_l = (offs + 1).to(tl.float64)
    lam = tl.load(coef_ptr)
    one_minus_lam = tl.load(coef_ptr + 1)
    # Two roundings, whatever the compiler's contraction settings: fma(p, q, +0.0) is exactly the
    # rounded product, and an fma result cannot be contracted into the add that follows. (A plain
    # lam * r_g + ... may become one FMA, a single rounding that selects different neurons.)
    a = tl.fma(lam, r_g, 0.0) + tl.fma(one_minus_lam, r_l, 0.0)
    tl.store(a_ptr + row + offs, a, mask=m)


def select_neurons(local: torch.Tensor, global_rank: torch.Tensor, lam: float, k: int) -> torch.Tensor:
    """Indices [B, k] int32 (sorted ascending) of the k neurons with the smallest aggregated rank.

    local fp32 [B, D] (or [D], giving [k]); global_rank int32 [D], 1 = best. Validated by ops.py.
    """
    squeeze = local.dim() == 1
    local2 = local.unsqueeze(0) if squeeze else local
    B, D = local2.shape
    lam = float(lam)
    order = torch.sort(local2, dim=1, descending=True, stable=True).indices
    # two fill kernels rather than torch.tensor(...): no host-to-device copy, so CUDA-graph safe
    coef = torch.full((2,), lam, dtype=torch.float64, device=local.device)
    coef[1].fill_(1.0 - lam)
    a = torch.empty((B, D), dtype=torch.float64, device=local.device)
    block = 64 if interpreting() or local.device.type != "cuda" else 1024
    launch(_select_neurons_kernel)[(B, cdiv(D, block))](
        order, global_rank, coef, a, D, BLOCK=block)
    pos = torch.sort(a, dim=1, stable=True).indices[:, :k]
    idx = torch.sort(order.gather(1, pos), dim=1).values.to(torch.int32)
    return idx.squeeze(0) if squeeze else idx
