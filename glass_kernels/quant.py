"""Quantized neuron rows: weight-only int8 / 4-bit formats, and the sparse FFN ops that read them.

Formats (``csrc/include/glass/glass.h``, ggml's Q8_0 / Q4_0 block layout byte for byte, so rows from
a GGUF file or another stack can be handed over as they are). A row of d values (d % 32 == 0) is
d / 32 blocks of 32 values:

    "q8_0"  34 bytes: fp16 scale s, int8 q[32];                 w_j = s * q_j
    "q4_0"  18 bytes: fp16 scale s, uint8 q[16] (two nibbles);  w_j = s * (nibble_j - 8),
            values 0..15 in the low nibbles of q[0..15], values 16..31 in the high nibbles

A quantized weight is a uint8 tensor [D, d / 32 * block_bytes], one row per neuron (neuron-major,
so a selected neuron's row stays one contiguous read); the rows of the weights of one call may be
any common number of whole blocks apart (separate matrices, or the views of one neuron-bundled
[D, n, row_bytes] block).

    q = quantize(w, "q8_0")              # w [R, d] float -> uint8 [R, row_bytes(d)]
    w = dequantize(q, "q8_0")            # -> fp32 [R, d]
    y = sparse_ffn_q(x, qg, qu, qd, idx, activation="silu", wtype="q8_0")
    y = sparse_mlp_q(x, qi, b_in, qo, b_out, idx, activation="gelu", wtype="q8_0")

Quantization follows ggml's reference rounding (Q8_0: s = max|w| / 127, q = round half away from
zero of w / s; Q4_0: s = -(the value of largest magnitude) / 8, q = min(15, floor(w / s + 8.5))), in
fp32, so a tensor quantized here equals ggml's ``quantize_row_q8_0_ref`` / ``_q4_0_ref``. The ops
accumulate in fp32 and return x's dtype; CPU tensors run the C++ core, CUDA tensors (or the "triton"
backend) the Triton kernel (glass_kernels/triton/sparse_ffn.py, dequantizing as it loads), and the
pure-torch reference is the fallback and the tests' owner of the semantics.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext, reference
from . import backend as _backend
from . import ops as _ops

__all__ = ["BLOCK", "QTYPES", "block_bytes", "dequantize", "quantize", "row_bytes", "sparse_ffn_q",
           "sparse_mlp_q"]

BLOCK = 32
QTYPES = ("q8_0", "q4_0")
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


def _qtype(wtype) -> str:
    if wtype not in QTYPES:
        raise ValueError(f"wtype must be one of {QTYPES}, got {wtype!r}")
    return wtype


def block_bytes(wtype: str) -> int:
    """Bytes of one block of 32 values."""
    return _BLOCK_BYTES[_qtype(wtype)]


def row_bytes(wtype: str, d: int) -> int:
    """Bytes of one quantized row of d values (d a multiple of 32)."""
    if d % BLOCK:
        raise ValueError(f"quantized rows need d to be a multiple of {BLOCK}, got d = {d}")
    return d // BLOCK * block_bytes(wtype)


def _round_half_away(v: Tensor) -> Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def quantize(w: Tensor, wtype: str = "q8_0") -> Tensor:
    """w [R, d] (float, d % 32 == 0) -> uint8 [R, row_bytes(wtype, d)], ggml's reference rounding."""
    _qtype(wtype)
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError("quantize: w must be a 2-D floating-point tensor [rows, d]")
    R, d = w.shape
    row_bytes(wtype, d)  # checks d
    b = w.detach().float().reshape(R, d // BLOCK, BLOCK)
    if wtype == "q8_0":
        s = b.abs().amax(-1) / 127.0
        inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
        q = _round_half_away(b * inv[..., None]).clamp_(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        idx = b.abs().argmax(-1, keepdim=True)  # the first value of largest magnitude, with its sign
        s = torch.gather(b, -1, idx).squeeze(-1) / -8.0
        inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
        n = torch.floor(b * inv[..., None] + 8.5).clamp_(0, 15).to(torch.uint8)
        q = n[..., :16] | (n[..., 16:] << 4)
    scale = s.to(torch.float16).contiguous().view(torch.uint8).reshape(R, d // BLOCK, 2)
    return torch.cat([scale, q], dim=-1).reshape(R, -1).to(w.device)


def dequantize(q: Tensor, wtype: str = "q8_0") -> Tensor:
    """uint8 [R, row_bytes] (any row stride) -> fp32 [R, d]: s * q for every value."""
    bb = block_bytes(wtype)
    if not isinstance(q, Tensor) or q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] % bb:
        raise TypeError(f"dequantize: q must be uint8 [rows, k * {bb}] ({wtype} blocks)")
    return reference.dequantize(q, wtype)


# ---- validation ---------------------------------------------------------------------------------

def _qweight(name: str, w, ref: Optional[Tensor], D: Optional[int], d: int, wtype: str) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 quantized rows ({wtype}), got dtype {w.dtype}")
    rb = row_bytes(wtype, d)
    if w.dim() != 2 or w.shape[1] != rb or w.shape[0] < 1 or (D is not None and w.shape[0] != D):
        want = f"[{D if D is not None else 'D'}, {rb}]"
        raise ValueError(f"{name} must have shape {want} ({wtype} rows of d = {d} values), got {tuple(w.shape)}")
    bb = block_bytes(wtype)
    if w.stride(1) != 1 or w.stride(0) < rb or w.stride(0) % bb:
        raise ValueError(f"{name}'s rows must be contiguous and a whole number of {bb}-byte blocks apart "
                         f"(>= {rb} bytes), got strides {tuple(w.stride())}")
    if ref is not None:
        if w.device != ref.device:
            raise ValueError(f"{name} is on {w.device} but w_gate/w_in is on {ref.device}")
        if w.stride(0) != ref.stride(0):
            raise ValueError(f"{name}'s rows are {w.stride(0)} bytes apart but the first weight's are "
                             f"{ref.stride(0)}; every weight of one call must have the same row stride")
    return w


def _x_float(x, w: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ops._FLOATS:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weights are on {w.device}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape [T, d] or [B, T, d], got {tuple(x.shape)}")
    return x


def _checked(x, ws: list, names: list, idx, activation, wtype, check_batch: bool = True) -> tuple[Tensor, Tensor, int]:
    _qtype(wtype)
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        _x_float(x, ws[0] if isinstance(ws[0], Tensor) else torch.empty(0))
    d = int(x.shape[-1])
    w0 = _qweight(names[0], ws[0], None, None, d, wtype)
    D = int(w0.shape[0])
    for n, w in zip(names[1:], ws[1:]):
        _qweight(n, w, w0, D, d, wtype)
    x = _x_float(x, w0)
    _ops._activation(activation)
    idx = _ops._idx_checked(idx, D, w0)
    if check_batch and idx.dim() == 2 and idx.shape[0] != (x.shape[0] if x.dim() == 3 else 1):
        raise ValueError(f"idx has {idx.shape[0]} rows ([B, k]) but x has batch B = {x.shape[0] if x.dim() == 3 else 1}")
    return x.contiguous(), idx, D


# ---- the registered ops -------------------------------------------------------------------------

_ops._lib.define("sparse_ffn_q(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, Tensor idx, str activation, "
                 "str wtype) -> Tensor")
_ops._lib.define("sparse_mlp_q(Tensor x, Tensor w_in, Tensor? b_in, Tensor w_out_t, Tensor? b_out, Tensor idx, "
                 "str activation, str wtype) -> Tensor")


def _ldw(w: Tensor, wtype: str) -> int:
    """The rows' stride in values (what the C core calls ldw)."""
    return w.stride(0) // block_bytes(wtype) * BLOCK


def _cpp_ok(x: Tensor) -> bool:
    return x.is_cpu and _backend.resolve_for(x) == "cpp"


def _triton_ok(x: Tensor) -> bool:
    return _backend.resolve_for(x) == "triton"


def _cpp_sparse_ffn_q(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, idx: Tensor, activation: str,
                      wtype: str) -> Tensor:
    """The C++ core's sparse_ffn_q on checked CPU operands (x contiguous)."""
    C, y, B, T, d = _ops._cpp_out(x)
    if B * T:
        C.sparse_ffn_q(wtype, _ops._DTYPE_NAME[x.dtype], activation, x.data_ptr(), B, T, d, w_gate.data_ptr(),
                       w_up.data_ptr(), w_down_t.data_ptr(), _ldw(w_gate, wtype), w_gate.shape[0],
                       idx.data_ptr(), idx.shape[-1], idx.dim() == 2, y.data_ptr())
    return y


def _cpp_sparse_mlp_q(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out_t: Tensor, b_out: Optional[Tensor],
                      idx: Tensor, activation: str, wtype: str) -> Tensor:
    """The C++ core's sparse_mlp_q on checked CPU operands (x contiguous)."""
    C, y, B, T, d = _ops._cpp_out(x)
    if B * T:
        C.sparse_mlp_q(wtype, _ops._DTYPE_NAME[x.dtype], activation, x.data_ptr(), B, T, d, w_in.data_ptr(),
                       _ops._ptr(b_in), w_out_t.data_ptr(), _ops._ptr(b_out), _ldw(w_in, wtype),
                       w_in.shape[0], idx.data_ptr(), idx.shape[-1], idx.dim() == 2, y.data_ptr())
    return y


@_ops._register("sparse_ffn_q")
def _sparse_ffn_q_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, idx: Tensor, activation: str,
                     wtype: str) -> Tensor:
    _ops._idx_values(idx, w_gate.shape[0])
    if _cpp_ok(x):
        return _cpp_sparse_ffn_q(x, w_gate, w_up, w_down_t, idx, activation, wtype)
    if _triton_ok(x):
        return _backend.triton_module().sparse_ffn_q(x, w_gate, w_up, w_down_t, idx, activation, wtype)
    return reference.sparse_ffn_q(x, w_gate, w_up, w_down_t, idx, activation, wtype)


@_ops._fake("sparse_ffn_q")
def _(x, w_gate, w_up, w_down_t, idx, activation, wtype):
    return torch.empty_like(x)


@_ops._register("sparse_mlp_q")
def _sparse_mlp_q_op(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out_t: Tensor, b_out: Optional[Tensor],
                     idx: Tensor, activation: str, wtype: str) -> Tensor:
    _ops._idx_values(idx, w_in.shape[0])
    if _cpp_ok(x):
        return _cpp_sparse_mlp_q(x, w_in, b_in, w_out_t, b_out, idx, activation, wtype)
    if _triton_ok(x):
        return _backend.triton_module().sparse_mlp_q(x, w_in, b_in, w_out_t, b_out, idx, activation, wtype)
    return reference.sparse_mlp_q(x, w_in, b_in, w_out_t, b_out, idx, activation, wtype)


@_ops._fake("sparse_mlp_q")
def _(x, w_in, b_in, w_out_t, b_out, idx, activation, wtype):
    return torch.empty_like(x)


def sparse_ffn_q(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, idx: Tensor, activation: str = "silu",
                 wtype: str = "q8_0") -> Tensor:
    """``ops.sparse_ffn`` over quantized rows: w_* uint8 [D, row_bytes(wtype, d)] (from ``quantize``; one
    common row stride, a whole number of blocks), x [T, d] or [B, T, d] fp32/fp16/bf16, d % 32 == 0."""
    x, idx, _ = _checked(x, [w_gate, w_up, w_down_t], ["w_gate", "w_up", "w_down_t"], idx, activation, wtype)
    return torch.ops.glass.sparse_ffn_q(x, w_gate, w_up, w_down_t, idx, activation, wtype)


def sparse_mlp_q(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out_t: Tensor, b_out: Tensor | None, idx: Tensor,
                 activation: str = "gelu", wtype: str = "q8_0") -> Tensor:
    """``ops.sparse_mlp`` over quantized rows (biases in x's dtype); otherwise as ``sparse_ffn_q``."""
    x, idx, D = _checked(x, [w_in, w_out_t], ["w_in", "w_out_t"], idx, activation, wtype)
    ref = torch.empty(0, dtype=x.dtype, device=x.device)
    b_in = _ops._bias("b_in", b_in, D, ref)
    b_out = _ops._bias("b_out", b_out, x.shape[-1], ref)
    return torch.ops.glass.sparse_mlp_q(x, w_in, b_in, w_out_t, b_out, idx, activation, wtype)


def kernel_name(wtype: str) -> str | None:
    """Name of the C++ kernel that runs ``wtype`` rows on this CPU (None without the extension)."""
    C = _ext.load()
    return C.qkernel_name(_qtype(wtype)) if C is not None else None


# ---- the patch layer's fast path (validate once per prompt, call once per token) ----------------

def validate_operands(operands: tuple, idx: Tensor, activation: str, wtype: str, gated: bool, x_dtype) -> Tensor:
    """Check a layer's quantized operands and idx once; returns idx as int32 contiguous (range checked)."""
    ws = list(operands) if gated else [operands[0], operands[2]]
    names = ["w_gate", "w_up", "w_down_t"] if gated else ["w_in", "w_out_t"]
    d = ws[0].shape[1] // block_bytes(wtype) * BLOCK
    probe = torch.empty(1, 1, d, dtype=x_dtype, device=ws[0].device)
    _, idx, D = _checked(probe, ws, names, idx, activation, wtype, check_batch=False)  # x is checked per call
    if idx.dtype == torch.int32:
        _ops._idx_values(idx, D)
    return idx.to(torch.int32).contiguous()


def _x_fast(x: Tensor, w: Tensor, idx: Tensor, wtype: str) -> None:
    """Attribute-only checks of x that keep the core in bounds (the fast path's only checks)."""
    d = w.shape[1] // block_bytes(wtype) * BLOCK
    if (x.dtype not in _ops._FLOATS or not w.is_cpu or x.dim() not in (2, 3) or x.shape[-1] != d
            or not x.is_contiguous()):
        raise ValueError(f"x must be a contiguous float [T, {d}] or [B, T, {d}] CPU tensor, got "
                         f"{x.dtype} {tuple(x.shape)}")
    if idx.dim() == 2 and idx.shape[0] != (x.shape[0] if x.dim() == 3 else 1):
        raise ValueError(f"idx has {idx.shape[0]} rows ([B, k]) but x has another batch size")


def sparse_ffn_q_prevalidated(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, idx: Tensor,
                              activation: str, wtype: str) -> Tensor:
    """``sparse_ffn_q`` for operands checked by ``validate_operands``; only x is checked here."""
    if _ops._fast_cpp_ok(x):
        _x_fast(x, w_gate, idx, wtype)
        return _cpp_sparse_ffn_q(x, w_gate, w_up, w_down_t, idx, activation, wtype)
    return torch.ops.glass.sparse_ffn_q(x.contiguous(), w_gate, w_up, w_down_t, idx, activation, wtype)


def sparse_mlp_q_prevalidated(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out_t: Tensor, b_out: Tensor | None,
                              idx: Tensor, activation: str, wtype: str) -> Tensor:
    """``sparse_mlp_q`` for operands checked by ``validate_operands``; only x is checked here."""
    if _ops._fast_cpp_ok(x):
        _x_fast(x, w_in, idx, wtype)
        return _cpp_sparse_mlp_q(x, w_in, b_in, w_out_t, b_out, idx, activation, wtype)
    return torch.ops.glass.sparse_mlp_q(x.contiguous(), w_in, b_in, w_out_t, b_out, idx, activation, wtype)
