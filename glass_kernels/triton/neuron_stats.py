"""Local neuron statistics in Triton: out[b, i] += sum_t (v_t,i / ||v_t||_2)^2.

v_t = h[b, t, :] (activation form) or h[b, t, :] * down_norms (impact form), in fp32; tokens whose
mask is 0 or whose norm is 0 add nothing (docs/architecture.md, docs/method.md).

Design: deterministic and atomic-free, two launches.
1. ``_neuron_stats_norm_kernel``: one program per (b, t) row computes ||v_t|| in fp32 over D
   (0 for masked tokens, so the second pass needs no mask).
2. ``_neuron_stats_kernel``: one program per (b, D block) walks the tokens in BLOCK_T tiles,
   sums (v / n)^2 over t in fp32 in a fixed order and adds the block into out[b, :], which it
   alone owns.
The one-kernel alternative (a program per (b, t) row atomically adding into out[b, :]) gives
run-to-run differences in the last bits, which can reorder near-tied neurons and so change the
selected set between identical runs; the extra launch costs a few microseconds once per prompt.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glass_kernels.triton._utils import cdiv, interpreting, launch, target_programs


@triton.jit
def _neuron_stats_norm_kernel(
    h_ptr, dn_ptr, mask_ptr, norm_ptr, D,
    HAS_DN: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * D
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, D, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < D
        v = tl.load(h_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_DN:
            v = v * tl.load(dn_ptr + offs, mask=m, other=0.0)
        ss += v * v
    n = tl.sqrt(tl.sum(ss, axis=0))
    if HAS_MASK:
        keep = tl.load(mask_ptr + row)
        n = tl.where(keep != 0, n, 0.0)
    tl.store(norm_ptr + row, n)


@triton.jit
def _neuron_stats_kernel(
    h_ptr, dn_ptr, norm_ptr, out_ptr, T, D,
    HAS_DN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if HAS_DN:
        dn = tl.load(dn_ptr + offs_d, mask=mask_d, other=0.0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        rows = (b * T + offs_t).to(tl.int64)
        n = tl.load(norm_ptr + rows, mask=mask_t, other=0.0)
        v = tl.load(h_ptr + rows[:, None] * D + offs_d[None, :],
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if HAS_DN:
            v = v * dn[None, :]
        # divide before squaring, as the reference does; n == 0 (masked or all-zero row) adds 0
        safe_n = tl.where(n > 0, n, 1.0)
        q = v / safe_n[:, None]
        acc += tl.sum(tl.where((n > 0)[:, None], q * q, 0.0), axis=0)
    o_ptrs = out_ptr + b.to(tl.int64) * D + offs_d
    tl.store(o_ptrs, tl.load(o_ptrs, mask=mask_d, other=0.0) + acc, mask=mask_d)


def neuron_stats_(h: torch.Tensor, down_norms: torch.Tensor | None, mask: torch.Tensor | None,
                  out: torch.Tensor) -> torch.Tensor:
    """Add the statistic of ``h`` [B, T, D] (or [T, D]) into ``out`` fp32 [B, D]; return ``out``.

    ``down_norms`` fp32 [D] selects the impact form; ``mask`` [B, T] (uint8 or bool, nonzero =
    token counts) excludes padding. Inputs are validated by ops.py.
    """
    h3 = h.unsqueeze(0) if h.dim() == 2 else h
    B, T, D = h3.shape
    if B * T == 0 or D == 0:
        return out
    h3 = h3.contiguous()
    out2 = out.view(B, D)
    if mask is not None:
        mask = mask.reshape(B * T)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; the kernel tests != 0
    norms = torch.empty(B * T, device=h.device, dtype=torch.float32)
    dummy = norms
    interp = interpreting() or h.device.type != "cuda"
    launch(_neuron_stats_norm_kernel)[(B * T,)](
        h3, down_norms if down_norms is not None else dummy, mask if mask is not None else dummy,
        norms, D, HAS_DN=down_norms is not None, HAS_MASK=mask is not None,
        BLOCK=64 if interp else 1024, num_warps=4)
    # D block: 128 columns (256 B bf16 rows per token) unless that leaves the GPU under-filled.
    if interp:
        block_d, block_t = 32, 4
    else:
        block_d, block_t = 128, 16
        while block_d > 32 and B * cdiv(D, block_d) < target_programs(h.device) // 2:
            block_d //= 2
    launch(_neuron_stats_kernel)[(B, cdiv(D, block_d))](
        h3, down_norms if down_norms is not None else dummy, norms, out2, T, D,
        HAS_DN=down_norms is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out
