"""Gathered sparse FFN in Triton: y[b, t] = sum_{i in idx_b} h_i(x[b, t]) * W_out_t[i].

Gated (``sparse_ffn``):     h_i = act(W_gate[i] . x) * (W_up[i] . x)
Non-gated (``sparse_mlp``): h_i = act(W_in[i] . x + b_in[i]),   y += b_out

All weights are neuron-major [D, d] (docs/architecture.md), so every selected neuron is three
contiguous rows: the kernel gathers them in place, no compacted copy.

Design (batch-1 decode is HBM-bound: every selected weight byte is read exactly once):
- grid = (split, b, token tile). Program ``s`` owns the selected neurons
  [s * npp, (s + 1) * npp) of sequence ``b`` and loops over them in BLOCK_K blocks; for each block
  it computes the gate/up dot products over d in BLOCK_D chunks (fp32 accumulation), the
  activation in fp32, then the down contribution sum_i h_i * W_out_t[i, :] for all tokens of its
  tile, so each weight tile is loaded once for all the tokens of the tile.
- Reduction across programs is DETERMINISTIC: program ``s`` writes its own fp32 partial row
  part[s, b, t, :] (the first block stores, later blocks read-add-write the row they own), and a
  second kernel sums the ``split`` rows in a fixed order, adds b_out and casts to the output dtype.
  Why not fp32 atomics into a zeroed buffer: atomics need a memset launch and a cast launch (three
  launches against two here), give run-to-run differences (the dense-vs-sparse KL evaluation and
  CUDA-graph replays should be bit-reproducible), and make the kernel non-idempotent, which the
  autotuner's repeated benchmark runs would corrupt. bf16/fp16 never touch atomics either way.
  The cost is the partial rows, split * B * T * d * 4 bytes written and read once, i.e. 4/(3 npp)
  of the bf16 weight bytes for npp neurons per program (8% at npp = 16, 4% at 32), though at
  decode they are small enough to stay in L2 (896 rows * 16 KiB = 14 MiB at (4096, 14336) keep 1.0
  with npp = 16; H100 L2 = 50 MB), plus a second launch of a few microseconds; fp32 atomics would
  pay the same L2 traffic as atomic transactions plus a memset and a cast launch.
- Dot products: elementwise multiply + tl.sum in fp32 for small token tiles (decode T = 1, or a
  few speculative tokens); tl.dot for tiles of 16 tokens (teacher-forced continuations). Under the
  interpreter, and for fp32 weights, tl.dot runs on fp32 operands with input_precision="ieee":
  the interpreter's bf16 dot is wrong (triton-lang/triton#11584) and tf32 would lose 10 bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glass_kernels.triton import _utils
from glass_kernels.triton._utils import activation_code, bucket, cdiv, interpreting, launch

# Partial rows beyond this many bytes make the split coarser (only reachable for long T or big B,
# never at decode): the buffer is allocated per call.
_MAX_PARTIAL_BYTES = 256 << 20


@triton.jit
def _activation(g, ACT: tl.constexpr):
    # fp32 in, fp32 out; codes as glass_activation in glass.h.
    if ACT == 0:  # silu
        h = g * tl.sigmoid(g)
    elif ACT == 1:  # gelu_tanh: 0.5 g (1 + tanh(z)) == g * sigmoid(2 z), no cancellation near 0
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        h = g * tl.sigmoid(2.0 * z)
    elif ACT == 2:  # gelu, exact erf form
        h = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:  # relu; NaN stays NaN, as torch.relu does (the GPU's max would return 0)
        h = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return h


@triton.jit
def _accumulate(acc, xt, w, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    # acc += the tokens' dot products with the neurons' rows: [T, K] with tl.dot (fp32 operands at
    # IEEE precision for fp32 weights), else [T, K, BLOCK_D] partial products (summed later).
    if USE_DOT:
        if DOT_F32:
            acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w), acc)
    else:
        acc += xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _load_rows(w_ptr, rows, offs_d, mask, QTYPE: tl.constexpr):
    # [K, BLOCK_D] weights of the rows starting at element (float) or byte (quantized) offsets
    # ``rows``. Quantized rows (glass.h's glass_qtype) are 32-value blocks: an fp16 scale (2 bytes,
    # little-endian) then Q8_0: 32 int8 values; Q4_0: 16 bytes, value i in the low nibble of byte i
    # (i < 16) or the high nibble of byte i - 16, minus 8. The value is scale * q, in fp32.
    # (one return at the end: Triton compiles code after a return inside a constexpr branch)
    if QTYPE == 0:
        w = tl.load(w_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    else:
        block_bytes: tl.constexpr = 34 if QTYPE == 1 else 18
        pos = offs_d % 32
        base = rows[:, None] + ((offs_d // 32) * block_bytes)[None, :]
        lo = tl.load(w_ptr + base, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(w_ptr + base + 1, mask=mask, other=0).to(tl.uint16)
        scale = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        if QTYPE == 1:
            q = tl.load(w_ptr + base + 2 + pos[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
            w = q.to(tl.float32) * scale
        else:
            byte = tl.load(w_ptr + base + 2 + (pos % 16)[None, :], mask=mask, other=0).to(tl.int32)
            w = (((byte >> ((pos // 16) * 4)[None, :]) & 15).to(tl.float32) - 8.0) * scale
    return w


@triton.jit
def _sparse_ffn_kernel(
    x_ptr, w1_ptr, w3_ptr, wo_ptr, b1_ptr, idx_ptr, part_ptr,
    B, T, d, ldw, k, idx_stride_b, npp,
    D_BUCKET, K_BUCKET,  # autotune keys only
    GATED: tl.constexpr, HAS_B1: tl.constexpr, ACT: tl.constexpr,
    BLOCK_T: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, QTYPE: tl.constexpr = 0,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    pid_t = tl.program_id(2)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    x_rows = (b * T + offs_t).to(tl.int64) * d
    p_rows = ((pid_s * B + b) * T + offs_t).to(tl.int64) * d
    arange_k = tl.arange(0, BLOCK_K)
    arange_d = tl.arange(0, BLOCK_D)

    for j in range(0, npp, BLOCK_K):
        offs_k = pid_s * npp + j + arange_k
        mask_k = offs_k < k
        # int64 row offsets: D * d can pass 2**31 elements on large models.
        ridx = tl.load(idx_ptr + b * idx_stride_b + offs_k, mask=mask_k, other=0).to(tl.int64)
        # weight rows are ldw elements apart (d, or 3d / 2d in the neuron-bundled layout); quantized
        # rows (QTYPE > 0): ldw bytes apart
        rows = ridx * ldw

        # Broadcast path: keep [BLOCK_T, BLOCK_K, BLOCK_D] fp32 partial products and reduce over d
        # once after the loop (one cross-lane reduction per block instead of one per d chunk).
        if USE_DOT:
            acc1 = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        else:
            acc1 = tl.zeros([BLOCK_T, BLOCK_K, BLOCK_D], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK_T, BLOCK_K, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < d
            xt = tl.load(x_ptr + x_rows[:, None] + offs_d[None, :],
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            w_mask = mask_k[:, None] & mask_d[None, :]
            w1 = _load_rows(w1_ptr, rows, offs_d, w_mask, QTYPE)
            acc1 = _accumulate(acc1, xt, w1, USE_DOT, DOT_F32)
            if GATED:
                w3 = _load_rows(w3_ptr, rows, offs_d, w_mask, QTYPE)
                acc3 = _accumulate(acc3, xt, w3, USE_DOT, DOT_F32)
        if USE_DOT:
            g = acc1
            u = acc3
        else:
            g = tl.sum(acc1, axis=2)
            u = tl.sum(acc3, axis=2)

        if HAS_B1:
            b1 = tl.load(b1_ptr + ridx, mask=mask_k, other=0.0).to(tl.float32)
            g += b1[None, :]
        h = _activation(g, ACT)
        if GATED:
            h = h * u
        # Padding neurons/tokens must contribute exactly 0 (act(b_in[0]) is not 0 for gelu).
        h = tl.where(mask_t[:, None] & mask_k[None, :], h, 0.0)

        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < d
            wo = _load_rows(wo_ptr, rows, offs_d, mask_k[:, None] & mask_d[None, :], QTYPE).to(tl.float32)
            if USE_DOT:
                y = tl.dot(h, wo, input_precision="ieee")
            else:
                y = tl.sum(h[:, :, None] * wo[None, :, :], axis=1)
            p_off = p_rows[:, None] + offs_d[None, :]
            p_mask = mask_t[:, None] & mask_d[None, :]
            if j > 0:  # this program owns the row: read-add-write, no atomics, fixed order
                y += tl.load(part_ptr + p_off, mask=p_mask, other=0.0)
            tl.store(part_ptr + p_off, y, mask=p_mask)


@triton.jit
def _sparse_ffn_reduce_kernel(
    part_ptr, bo_ptr, y_ptr, n_rows, d, n_split,
    HAS_BO: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, n_split):
        acc += tl.load(part_ptr + (s * n_rows + row).to(tl.int64) * d + offs_d, mask=mask_d, other=0.0)
    if HAS_BO:
        acc += tl.load(bo_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if OUT_BF16:
        # Round to nearest even by hand: Triton's interpreter casts fp32 -> bf16 by truncation
        # (a 1-ulp bias the CI tests would see); on the GPU this matches cvt.rn.bf16.f32.
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        out = tl.where(acc != acc, acc.to(tl.bfloat16), out)  # keep NaN a NaN
    else:
        out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row.to(tl.int64) * d + offs_d, out, mask=mask_d)


def _prune_configs(configs, named_args, **kwargs):
    # A program walks npp neurons in BLOCK_K steps: BLOCK_K must divide npp (both powers of two).
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= named_args["npp"]]
    return kept or configs[:1]  # every list starts with a BLOCK_K = 16 config and npp >= 16


def bcast_configs(block_t: int) -> list:
    """Configs of the broadcast (T <= 8) path that compile without register spills on sm_90.

    Measured with benchmarks/gpu/check_compile.py (ptxas through triton.compile, no GPU needed):
    BLOCK_T * BLOCK_K * BLOCK_D fp32 accumulators stay spill-free up to 32 elements per thread at
    BLOCK_K = 16 and 16 per thread at BLOCK_K = 32 (BLOCK_K = 64 spilled at 32 per thread), i.e.
    BLOCK_T * BLOCK_K^2 * BLOCK_D <= 16384 * num_warps; BLOCK_K = 32 with 2+ tokens left an 8-byte
    stack frame in sparse_mlp (gelu), so it is kept for T = 1 only. BLOCK_D >= 64: 128-byte rows.
    """
    return _bcast_configs(block_t, 16384)


def quant_bcast_configs(block_t: int) -> list:
    """``bcast_configs`` for quantized rows: dequantizing holds a scale and the raw bytes beside each
    fp32 weight, so half the budget (BLOCK_T * BLOCK_K^2 * BLOCK_D <= 8192 * num_warps; Q4_0 at
    16384 spilled 200 bytes at BLOCK_D 256 and 512), measured as above."""
    return _bcast_configs(block_t, 8192)


def _bcast_configs(block_t: int, budget: int) -> list:
    cfgs = [triton.Config({"BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=3)
            for bk in (16, 32) for bd in (64, 128, 256, 512) for w in (4, 8)
            if block_t * bk * bk * bd <= budget * w and (bk == 16 or block_t == 1)]
    return cfgs or [triton.Config({"BLOCK_K": 16, "BLOCK_D": 32}, num_warps=4, num_stages=3)]


# tl.dot path (16-token tiles): BLOCK_K 64 or BLOCK_D 128 at 4 warps spilled on sm_90, and so did
# (BLOCK_K 32, 2 stages) for fp32 sparse_mlp.
DOT_CONFIGS = [
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_K": 32, "BLOCK_D": 64}, num_warps=4, num_stages=3),
]
# Quantized rows on the tl.dot path: 16 tokens x (16 or 32 neurons) x 64 values spilled (4 or 8 warps;
# Q4_0 up to 456 bytes); 32-value chunks (one quantized block) did not.
QUANT_DOT_CONFIGS = [
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 16, "BLOCK_D": 32}, num_warps=4, num_stages=3),
]
# Keys: d and the D / k buckets (explicit and stable, the contract), npp (how many
# neurons one program walks), gated or not, the row format; the Autotuner adds every tensor's dtype by itself.
# One autotuner per token tile, each with the configs that fit that tile.
_KEY = ["d", "D_BUCKET", "K_BUCKET", "npp", "GATED", "QTYPE"]
_PRUNE = {"early_config_prune": _prune_configs}


def _tuned(configs: list):
    return triton.autotune(configs, key=_KEY, prune_configs_by=_PRUNE)(_sparse_ffn_kernel)


# One autotuner per (token tile, quantized rows or not), each with the configs that fit it.
_TUNED = {(bt, False): _tuned(bcast_configs(bt)) for bt in (1, 2, 4, 8)}
_TUNED.update({(bt, True): _tuned(quant_bcast_configs(bt)) for bt in (1, 2, 4, 8)})
_TUNED[16, False] = _tuned(DOT_CONFIGS)
_TUNED[16, True] = _tuned(QUANT_DOT_CONFIGS)

# Fixed configuration under the interpreter: small tiles so that odd d (e.g. 37) spans several
# masked chunks, and no autotuning (each interpreted launch costs hundreds of ms).
_INTERP_BLOCK_K = 16
_INTERP_BLOCK_D = 32
_REDUCE_BLOCK_D = 1024


def _plan(B: int, T: int, d: int, k: int, device: torch.device) -> dict:
    """Tile sizes and split of a launch (pure function of the shapes; tests check both paths)."""
    block_t = 1 if T == 1 else min(16, triton.next_power_of_2(T))
    n_t = cdiv(T, block_t)
    interp = interpreting() or device.type != "cuda"
    min_npp = _INTERP_BLOCK_K if interp else 16
    target = 2 if interp else _utils.target_programs(device)
    # neurons per program: the largest power of two leaving >= target programs, at least one block
    npp = min_npp
    while cdiv(k, npp * 2) * B * n_t >= target and npp * 2 <= triton.next_power_of_2(k):
        npp *= 2
    while cdiv(k, npp) * B * T * d * 4 > _MAX_PARTIAL_BYTES and npp < k:
        npp *= 2
    return {"BLOCK_T": block_t, "n_t": n_t, "npp": npp, "n_split": cdiv(k, npp),
            "USE_DOT": block_t >= 16, "interp": interp}


_QTYPE_CODE = {None: 0, "q8_0": 1, "q4_0": 2}


def _sparse_launch(x, w1, w3, wo, b1, bo, idx, activation: str, gated: bool, wtype: str | None = None):
    act = activation_code(activation)
    shape = x.shape
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    B, T, d = x3.shape
    if idx.dim() == 1:
        # One neuron set for the whole batch: the sequences are just more tokens of one tile
        # stream, so each weight tile is loaded once for all of them instead of once per sequence.
        x3 = x3.reshape(1, B * T, d)
        B, T = 1, B * T
    D = w1.shape[0]
    k = idx.shape[-1]
    qtype = _QTYPE_CODE[wtype]
    idx_stride_b = k if idx.dim() == 2 else 0
    x3 = x3.contiguous()
    y = torch.empty_like(x3)
    if B * T == 0:
        return y.reshape(shape)
    p = _plan(B, T, d, k, x.device)
    n_split = p["n_split"]
    part = torch.empty((n_split, B, T, d), device=x.device, dtype=torch.float32)
    dummy = x3  # never read: HAS_B1 / HAS_BO are constexpr False
    args = (x3, w1, w3 if gated else w1, wo, b1 if b1 is not None else dummy, idx, part,
            B, T, d, w1.stride(0), k, idx_stride_b, p["npp"], bucket(D), bucket(k))
    # quantized rows dequantize to fp32: tl.dot then takes fp32 operands too
    meta = dict(GATED=gated, HAS_B1=b1 is not None, ACT=act, BLOCK_T=p["BLOCK_T"], USE_DOT=p["USE_DOT"],
                DOT_F32=p["interp"] or x.dtype == torch.float32 or qtype > 0, QTYPE=qtype)
    grid_main = (n_split, B, p["n_t"])
    if n_split == 0:  # k == 0: y = b_out (or 0); the reduction below sums no partial row
        pass
    elif p["interp"]:
        launch(_sparse_ffn_kernel)[grid_main](*args, **meta, BLOCK_K=_INTERP_BLOCK_K,
                                              BLOCK_D=_INTERP_BLOCK_D)
    else:
        launch(_TUNED[p["BLOCK_T"], qtype > 0])[grid_main](*args, **meta)
    reduce_block = 64 if p["interp"] else _REDUCE_BLOCK_D
    launch(_sparse_ffn_reduce_kernel)[(B * T, cdiv(d, reduce_block))](
        part, bo if bo is not None else dummy, y, B * T, d, n_split,
        HAS_BO=bo is not None, OUT_BF16=x.dtype == torch.bfloat16, BLOCK_D=reduce_block)
    return y.reshape(shape)


def sparse_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
               idx: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Gated sparse FFN over the neurons ``idx`` ([k] shared or [B, k] per sequence).

    x [B, T, d] or [T, d]; weights [D, d] neuron-major, rows one common stride apart (contiguous,
    or views of the neuron-bundled [D, 3, d] block); inputs already validated by ops.py.
    Returns y with x's shape and dtype, accumulated in fp32.
    """
    return _sparse_launch(x, w_gate, w_up, w_down_t, None, None, idx, activation, gated=True)


def sparse_mlp(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out_t: torch.Tensor,
               b_out: torch.Tensor | None, idx: torch.Tensor, activation: str = "gelu") -> torch.Tensor:
    """Non-gated sparse MLP: y = sum_{i in idx} act(W_in[i] . x + b_in[i]) * W_out_t[i] + b_out."""
    return _sparse_launch(x, w_in, None, w_out_t, b_in, b_out, idx, activation, gated=False)


def sparse_ffn_q(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                 idx: torch.Tensor, activation: str, wtype: str) -> torch.Tensor:
    """``sparse_ffn`` over quantized rows (uint8 [D, row_bytes], glass_kernels.quant's layout; rows one
    common byte stride apart, a whole number of blocks): the same kernel, dequantizing as it loads."""
    return _sparse_launch(x, w_gate, w_up, w_down_t, None, None, idx, activation, gated=True, wtype=wtype)


def sparse_mlp_q(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out_t: torch.Tensor,
                 b_out: torch.Tensor | None, idx: torch.Tensor, activation: str, wtype: str) -> torch.Tensor:
    """``sparse_mlp`` over quantized rows (see ``sparse_ffn_q``)."""
    return _sparse_launch(x, w_in, None, w_out_t, b_in, b_out, idx, activation, gated=False, wtype=wtype)
