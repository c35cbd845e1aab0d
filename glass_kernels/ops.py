"""The GLASS ops: validated public wrappers over ``torch.library`` custom ops in namespace ``glass``.

Public contract (issue 2, docs/architecture.md)::

    y   = ops.sparse_ffn(x, w_gate, w_up, w_down_t, idx, activation="silu")
    y   = ops.sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, activation="gelu")
    s   = ops.neuron_stats(h, down_norms=None, mask=None, out=None)
    idx = ops.select_neurons(local, global_rank, lam, k)

Registered ops (Library.define + impl, each with a fake implementation, so
``torch.compile(fullgraph=True)`` traces them):
``glass::sparse_ffn``, ``glass::sparse_mlp``, ``glass::neuron_stats`` (functional),
``glass::neuron_stats_`` (adds into ``out``; a mutating op), ``glass::select_neurons``.

Validation happens in the public wrappers, before any pointer reaches C++, and raises
TypeError (wrong type / dtype), ValueError (shape, device, contiguity, value) or IndexError
(idx out of [0, D)); every message names the argument. Checks that read tensor values
(idx range, finite scores, rank range) run inside the op implementation, i.e. eagerly even
under torch.compile, before the kernel is called.

Weight layout: weights (w_*) are [D, d] with contiguous rows, all rows of all weights of one call
the same stride apart: contiguous tensors (stride d), or the views of a neuron-bundled [D, 3, d]
block (``w_gate = P[:, 0]``, ``w_up = P[:, 1]``, ``w_down_t = P[:, 2]``, stride 3d; see
``glass_kernels.ffn.layout.bundled_views``). Copying a weight per call would cost more than the op, so any other
layout is an error. Activations, idx, biases, masks, norms and scores are made contiguous (a copy
only when they are not already).

Inference only: the ops have no autograd formula. Registering one (torch.library.register_autograd)
measured +6 us per call under no_grad and +23 us with grad enabled, so none is registered; a
backward through an op gets PyTorch's "autograd kernel was not registered" warning and no
gradients for its inputs. Call them under torch.no_grad() / torch.inference_mode().

Fast path for the patch layer (validate once per prompt, call once per token)::

    idx32 = ops.validate_sparse_ffn_operands(w_gate, w_up, w_down_t, idx, activation)
    y = ops.sparse_ffn_prevalidated(x, w_gate, w_up, w_down_t, idx32, activation)   # per token

The ``*_prevalidated`` functions check only x (dtype, device, last dim, rank, batch, contiguity:
attribute reads that keep the C++ core from reading out of bounds) and call ``_C`` directly in
eager mode on CPU (backend "auto" or "cpp"); under ``torch.compiler.is_compiling()``, for other
devices or other backends they call the registered op.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import _ext, reference
from . import backend as _backend

logger = logging.getLogger(__name__)

__all__ = [
    "sparse_ffn", "sparse_mlp", "neuron_stats", "select_neurons",
    "validate_sparse_ffn_operands", "validate_sparse_mlp_operands",
    "sparse_ffn_prevalidated", "sparse_mlp_prevalidated", "ACTIVATIONS",
]

ACTIVATIONS = reference.ACTIVATIONS
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_INTS = (torch.int32, torch.int64)
_INT_LIKE = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ---------------------------------------------------------------------------------------------
# validation helpers (shape / dtype / device checks need no tensor values: traceable)
# ---------------------------------------------------------------------------------------------

def _tensor(name: str, t) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _same(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def _weight(name: str, w, ref_name: str, ref: Tensor | None, D: int | None, d: int | None) -> Tensor:
    w = _tensor(name, w)
    _float_dtype(name, w)
    if ref is not None:
        _same(name, w, ref_name, ref)
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [D, d] (neuron-major), got shape {tuple(w.shape)}")
    if D is not None and (w.shape[0] != D or w.shape[1] != d):
        raise ValueError(f"{name} must have shape [D, d] = [{D}, {d}], got {tuple(w.shape)}")
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"{name} must have D >= 1 and d >= 1, got shape {tuple(w.shape)}")
    if not _rows_ok(w):
        raise ValueError(f"{name} must be [D, d] with contiguous rows (contiguous, or a view of a "
                         f"neuron-bundled [D, 3, d] block), got strides {tuple(w.stride())}; weights are "
                         "never copied per call: pass .contiguous() once, outside the decode loop")
    if ref is not None and ref.dim() == 2 and w.stride(0) != ref.stride(0):
        raise ValueError(f"{name}'s rows are {w.stride(0)} elements apart but {ref_name}'s are "
                         f"{ref.stride(0)}; every weight of one call must have the same row stride")
    return w


def _rows_ok(w: Tensor) -> bool:
    """[D, d] with each row contiguous and rows at least d apart (what the kernels' ldw allows)."""
    return (w.shape[1] == 1 or w.stride(1) == 1) and w.stride(0) >= w.shape[1]


def row_stride(w: Tensor) -> int:
    """The distance between a weight's rows in elements (d for contiguous [D, d], 3d when bundled)."""
    return w.stride(0)


def _weights_ok(ws) -> bool:
    """Happy-path check of same-shape weights in one pass (~3x cheaper than the detailed checks,
    which run only when this fails, to raise the precise error)."""
    w0 = ws[0]
    if not isinstance(w0, torch.Tensor):
        return False
    dt, sh, dev = w0.dtype, w0.shape, w0.device
    if dt not in _FLOATS or len(sh) != 2 or sh[0] < 1 or sh[1] < 1 or not _rows_ok(w0):
        return False
    ld = w0.stride(0)
    for w in ws[1:]:
        if (not isinstance(w, torch.Tensor) or w.dtype != dt or w.shape != sh or not _rows_ok(w)
                or w.stride(0) != ld or w.device != dev):
            return False
    return True


def _activation(activation) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _idx_checked(idx, D: int, ref: Tensor) -> Tensor:
    """idx [k] or [B, k], int32/int64, on ref's device; returned int32 contiguous (range checked
    here on int64 input before narrowing, and on int32 in the op)."""
    idx = _tensor("idx", idx)
    if idx.dtype not in _INTS:
        raise TypeError(f"idx must be an int32 or int64 tensor, got {idx.dtype}")
    if idx.device != ref.device:
        raise ValueError(f"idx is on {idx.device} but the weights are on {ref.device}")
    if idx.dim() not in (1, 2):
        raise ValueError(f"idx must have shape [k] or [B, k], got {tuple(idx.shape)}")
    if idx.shape[-1] < 1:
        raise ValueError(f"idx must select at least one neuron (k >= 1), got shape {tuple(idx.shape)}")
    if idx.dtype == torch.int64:
        if torch.compiler.is_compiling():
            return idx.to(torch.int32).contiguous()  # values are checked by the op at run time
        lo, hi = _idx_values(idx, D)  # before narrowing: int64 values >= 2**31 would wrap
        idx32 = idx.to(torch.int32).contiguous()
        _remember(idx32, lo, hi)  # so the op does not scan the fresh copy again
        return idx32
    return idx.contiguous()


# idx / global_rank tensors already scanned: id(tensor) -> (weakref, version counter, min, max). A decode loop
# that passes the same idx every token pays the min/max scan (~9 us for k = 768 here) once. The
# version counter changes with every in-place write (also through views), so a modified idx is
# scanned again. Inference tensors have no version counter and are scanned every time. Writes
# that bypass the counter (through `.data`, a numpy view or a raw pointer) are not seen: the C++
# core still checks every index (IndexError), the reference's index_select raises too. A plain
# dict keyed by id (entry removed by the weakref callback when the tensor dies) is used because
# torch.utils.weak.WeakIdKeyDictionary.get measured ~6 us per lookup here, the scan's own order.
_scanned: dict[int, tuple] = {}


def _forget(key: int):
    return lambda _ref: _scanned.pop(key, None)


def _remember(t: Tensor, lo: int, hi: int) -> None:
    if not t.is_inference():
        key = id(t)
        entry = _scanned.get(key)
        ref = entry[0] if entry is not None and entry[0]() is t else weakref.ref(t, _forget(key))
        _scanned[key] = (ref, t._version, lo, hi)


def _value_range(t: Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor: one aminmax, or none for an unchanged tensor seen before."""
    inference = t.is_inference()
    if not inference:
        seen = _scanned.get(id(t))
        if seen is not None and seen[0]() is t and seen[1] == t._version:
            return seen[2], seen[3]
    lo, hi = torch.aminmax(t)
    lo, hi = int(lo), int(hi)
    if not inference:
        _remember(t, lo, hi)
    return lo, hi


def _idx_values(idx: Tensor, D: int) -> tuple[int, int]:
    """Check 0 <= idx < D; returns (min, max)."""
    lo, hi = _value_range(idx)
    if lo < 0 or hi >= D:
        raise IndexError(f"idx values must be in [0, D) = [0, {D}), got min {lo}, max {hi}")
    return lo, hi


def _rank_values(global_rank: Tensor, D: int) -> tuple[int, int]:
    lo, hi = _value_range(global_rank)
    if lo < 1 or hi > D:
        raise ValueError(f"global_rank values must be ranks in [1, D] = [1, {D}], got min {lo}, max {hi}")
    return lo, hi


def _x_checked(x, ref: Tensor, d: int, idx: Tensor) -> Tensor:
    x = _tensor("x", x)
    _float_dtype("x", x)
    if x.dtype != ref.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the weights have {ref.dtype}; they must match")
    if x.device != ref.device:
        raise ValueError(f"x is on {x.device} but the weights are on {ref.device}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape [T, d] or [B, T, d], got {tuple(x.shape)}")
    if x.shape[-1] != d:
        raise ValueError(f"x has last dimension {x.shape[-1]} but the weights have d = {d}")
    B = x.shape[0] if x.dim() == 3 else 1
    if idx.dim() == 2 and idx.shape[0] != B:
        raise ValueError(f"idx has {idx.shape[0]} rows ([B, k]) but x has batch B = {B}")
    return x.contiguous()


def _bias(name: str, b, n: int, ref: Tensor) -> Tensor | None:
    if b is None:
        return None
    b = _tensor(name, b)
    _float_dtype(name, b)
    _same(name, b, "the weights", ref)
    if b.dim() != 1 or b.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(b.shape)}")
    return b.contiguous()


def validate_sparse_ffn_operands(w_gate, w_up, w_down_t, idx, activation="silu") -> Tensor:
    """Check the per-prompt operands of sparse_ffn once; returns idx as int32 contiguous.

    Includes the idx range check (one min/max), so ``sparse_ffn_prevalidated`` can skip it.
    """
    _ext.load()  # so the prevalidated fast path finds _C without a per-call load
    w_gate = _weight("w_gate", w_gate, "", None, None, None)
    D, d = w_gate.shape
    _weight("w_up", w_up, "w_gate", w_gate, D, d)
    _weight("w_down_t", w_down_t, "w_gate", w_gate, D, d)
    _activation(activation)
    idx = _idx_checked(idx, D, w_gate)
    if idx.dtype == torch.int32 and not torch.compiler.is_compiling():
        _idx_values(idx, D)
    return idx


def validate_sparse_mlp_operands(w_in, b_in, w_out_t, b_out, idx, activation="gelu") -> Tensor:
    """Check the per-prompt operands of sparse_mlp once; returns idx as int32 contiguous.

    Biases must already be contiguous for the prevalidated path (they are: [D] and [d] parameters).
    """
    _ext.load()
    w_in = _weight("w_in", w_in, "", None, None, None)
    D, d = w_in.shape
    _weight("w_out_t", w_out_t, "w_in", w_in, D, d)
    for name, b, n in (("b_in", b_in, D), ("b_out", b_out, d)):
        b = _bias(name, b, n, w_in)
        if b is not None and not b.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _activation(activation)
    idx = _idx_checked(idx, D, w_in)
    if not torch.compiler.is_compiling():
        _idx_values(idx, D)
    return idx


# ---------------------------------------------------------------------------------------------
# implementations per backend (inputs validated; called from the registered ops)
# ---------------------------------------------------------------------------------------------

def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cpp_out(x: Tensor):
    """(the extension with torch's thread count, the output like x, B, T, d) for a sparse op's call."""
    C = _ext._C
    _ext.sync_threads(C)
    B = x.shape[0] if x.dim() == 3 else 1
    return C, torch.empty_like(x), B, x.shape[-2], x.shape[-1]


def _cpp_sparse_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, idx: Tensor,
                    activation: str) -> Tensor:
    """The one call of _C.sparse_ffn (the op's CPU kernel and the prevalidated decode path both use it);
    every operand has been validated: rows one stride apart, int32 idx, shapes and dtypes agreeing."""
    C, y, B, T, d = _cpp_out(x)
    if B * T == 0:
        return y
    C.sparse_ffn(_DTYPE_NAME[x.dtype], activation, x.data_ptr(), B, T, d, w_gate.data_ptr(),
                 w_up.data_ptr(), w_down_t.data_ptr(), w_gate.shape[0], idx.data_ptr(),
                 idx.shape[-1], idx.dim() == 2, y.data_ptr(), w_gate.stride(0))
    return y


def _cpp_sparse_mlp(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out_t: Tensor, b_out: Tensor | None,
                    idx: Tensor, activation: str) -> Tensor:
    """The one call of _C.sparse_mlp (see _cpp_sparse_ffn)."""
    C, y, B, T, d = _cpp_out(x)
    if B * T == 0:
        return y
    C.sparse_mlp(_DTYPE_NAME[x.dtype], activation, x.data_ptr(), B, T, d, w_in.data_ptr(), _ptr(b_in),
                 w_out_t.data_ptr(), _ptr(b_out), w_in.shape[0], idx.data_ptr(), idx.shape[-1],
                 idx.dim() == 2, y.data_ptr(), w_in.stride(0))
    return y


def _neuron_stats_into(h: Tensor, down_norms: Tensor | None, mask: Tensor | None, out: Tensor) -> None:
    """Add the statistic of h [B, T, D] into out fp32 [B, D] with the resolved backend."""
    which = _backend.resolve_for(h)
    B, T, D = h.shape
    if which == "cpp":
        C = _ext._C
        _ext.sync_threads(C)
        if B * T > 0:
            C.neuron_stats(_DTYPE_NAME[h.dtype], h.data_ptr(), B, T, D, _ptr(down_norms), _ptr(mask),
                           out.data_ptr())
    elif which == "triton":
        _backend.triton_module().neuron_stats_(h, down_norms, mask, out)
    else:
        reference.neuron_stats(h, down_norms, mask, out)


# ---------------------------------------------------------------------------------------------
# registered ops
# ---------------------------------------------------------------------------------------------
# Registered with Library.define + impl rather than torch.library.custom_op: measured on this
# machine, a custom_op call costs ~14 us of Python dispatch over calling the function, define+impl
# ~3 us (a decode-step FFN of SmolLM2 takes ~100-300 us). The kernels sit at
# CompositeExplicitAutograd, i.e. every device runs them (each picks its backend with resolve()),
# while fake tensors / meta use the register_fake implementations. The ops have no autograd formula.

_lib = torch.library.Library("glass", "DEF")
_lib.define("sparse_ffn(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, Tensor idx, str activation) -> Tensor")
_lib.define("sparse_mlp(Tensor x, Tensor w_in, Tensor? b_in, Tensor w_out_t, Tensor? b_out, Tensor idx, "
            "str activation) -> Tensor")
_lib.define("neuron_stats(Tensor h, Tensor? down_norms, Tensor? mask) -> Tensor")
_lib.define("neuron_stats_(Tensor h, Tensor? down_norms, Tensor? mask, Tensor(a!) out) -> ()")
_lib.define("select_neurons(Tensor local, Tensor global_rank, float lam, int k) -> Tensor")


def _register(name: str):
    def deco(fn):
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        return fn
    return deco


def _fake(name: str):
    def deco(fn):
        torch.library.register_fake(f"glass::{name}", fn, lib=_lib)
        return fn
    return deco


@_register("sparse_ffn")
def _sparse_ffn_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, idx: Tensor,
                   activation: str) -> Tensor:
    _idx_values(idx, w_gate.shape[0])
    which = _backend.resolve_for(x)
    if which == "cpp":
        return _cpp_sparse_ffn(x, w_gate, w_up, w_down_t, idx, activation)
    if which == "triton":
        return _backend.triton_module().sparse_ffn(x, w_gate, w_up, w_down_t, idx, activation)
    return reference.sparse_ffn(x, w_gate, w_up, w_down_t, idx, activation)


@_fake("sparse_ffn")
def _(x, w_gate, w_up, w_down_t, idx, activation):
    return torch.empty_like(x)


@_register("sparse_mlp")
def _sparse_mlp_op(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out_t: Tensor, b_out: Optional[Tensor],
                   idx: Tensor, activation: str) -> Tensor:
    _idx_values(idx, w_in.shape[0])
    which = _backend.resolve_for(x)
    if which == "cpp":
        return _cpp_sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, activation)
    if which == "triton":
        return _backend.triton_module().sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, activation)
    return reference.sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, activation)


@_fake("sparse_mlp")
def _(x, w_in, b_in, w_out_t, b_out, idx, activation):
    return torch.empty_like(x)


@_register("neuron_stats")
def _neuron_stats_op(h: Tensor, down_norms: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    out = torch.zeros((h.shape[0], h.shape[2]), dtype=torch.float32, device=h.device)
    _neuron_stats_into(h, down_norms, mask, out)
    return out


@_fake("neuron_stats")
def _(h, down_norms, mask):
    return h.new_empty((h.shape[0], h.shape[2]), dtype=torch.float32)


@_register("neuron_stats_")
def _neuron_stats_acc_op(h: Tensor, down_norms: Optional[Tensor], mask: Optional[Tensor], out: Tensor) -> None:
    _neuron_stats_into(h, down_norms, mask, out)


@_fake("neuron_stats_")
def _(h, down_norms, mask, out):
    return None


@_register("select_neurons")
def _select_neurons_op(local: Tensor, global_rank: Tensor, lam: float, k: int) -> Tensor:
    B, D = local.shape
    if B > 0 and not bool(torch.isfinite(local).all()):
        raise ValueError("local scores must be finite (found NaN or inf)")
    _rank_values(global_rank, D)
    which = _backend.resolve_for(local)
    if which == "cpp":
        C = _ext._C
        _ext.sync_threads(C)
        out = torch.empty((B, k), dtype=torch.int32, device=local.device)
        if B > 0:
            C.select_neurons(local.data_ptr(), B, D, global_rank.data_ptr(), float(lam), k, out.data_ptr())
        return out
    if which == "triton":
        return _backend.triton_module().select_neurons(local, global_rank, lam, k)
    return reference.select_neurons(local, global_rank, lam, k)


@_fake("select_neurons")
def _(local, global_rank, lam, k):
    return local.new_empty((local.shape[0], k), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# public wrappers
# ---------------------------------------------------------------------------------------------

def sparse_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, idx: Tensor,
               activation: str = "silu") -> Tensor:
    """Gated sparse FFN: y[b,t] = sum_{i in idx_b} act(W_gate[i].x) * (W_up[i].x) * W_down_t[i].

    x [T, d] or [B, T, d]; w_gate, w_up, w_down_t [D, d] (w_down_t = W_down.T), contiguous or
    views of one neuron-bundled [D, 3, d] block (rows the same stride apart, see the module doc);
    idx int32/int64 [k] (shared) or [B, k] (per sequence), values in [0, D); activation in
    "silu" | "gelu_tanh" | "gelu" | "relu". Returns y with x's shape and dtype (fp32 accumulation).
    """
    if not _weights_ok((w_gate, w_up, w_down_t)):
        w_gate = _weight("w_gate", w_gate, "", None, None, None)
        _weight("w_up", w_up, "w_gate", w_gate, *w_gate.shape)
        _weight("w_down_t", w_down_t, "w_gate", w_gate, *w_gate.shape)
    D, d = w_gate.shape
    _activation(activation)
    idx = _idx_checked(idx, D, w_gate)
    x = _x_checked(x, w_gate, d, idx)
    return torch.ops.glass.sparse_ffn(x, w_gate, w_up, w_down_t, idx, activation)


def sparse_mlp(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out_t: Tensor, b_out: Tensor | None,
               idx: Tensor, activation: str = "gelu") -> Tensor:
    """Non-gated sparse MLP (OPT, GPT-2): y[b,t] = sum_{i in idx_b} act(W_in[i].x + b_in[i]) * W_out_t[i] + b_out.

    w_in, w_out_t [D, d] (contiguous, or views of one [D, 2, d] block); b_in [D] and b_out [d] or
    None; otherwise as ``sparse_ffn``.
    """
    if not _weights_ok((w_in, w_out_t)):
        w_in = _weight("w_in", w_in, "", None, None, None)
        _weight("w_out_t", w_out_t, "w_in", w_in, *w_in.shape)
    D, d = w_in.shape
    b_in = _bias("b_in", b_in, D, w_in)
    b_out = _bias("b_out", b_out, d, w_in)
    _activation(activation)
    idx = _idx_checked(idx, D, w_in)
    x = _x_checked(x, w_in, d, idx)
    return torch.ops.glass.sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, activation)


def neuron_stats(h: Tensor, down_norms: Tensor | None = None, mask: Tensor | None = None,
                 out: Tensor | None = None) -> Tensor:
    """Per-neuron sum of squares of per-token-normalised activations (GRIFFIN's statistic, squared).

    h [B, T, D] (or [T, D], read as B = 1) float32/float16/bfloat16; down_norms [D] (any float
    dtype, used as fp32) gives the impact form; mask [B, T] (bool or integer, nonzero = count the
    token) excludes padding; out fp32 [B, D] contiguous, added into and returned when given,
    else a new fp32 [B, D] tensor is returned.
    """
    h = _tensor("h", h)
    _float_dtype("h", h)
    if h.dim() == 2:
        h = h.unsqueeze(0)
    if h.dim() != 3:
        raise ValueError(f"h must have shape [B, T, D] (or [T, D]), got {tuple(h.shape)}")
    B, T, D = h.shape
    if D < 1:
        raise ValueError(f"h must have D >= 1, got shape {tuple(h.shape)}")
    h = h.contiguous()
    if down_norms is not None:
        down_norms = _tensor("down_norms", down_norms)
        if not down_norms.is_floating_point():
            raise TypeError(f"down_norms must be a floating tensor, got {down_norms.dtype}")
        if down_norms.device != h.device:
            raise ValueError(f"down_norms is on {down_norms.device} but h is on {h.device}")
        if down_norms.dim() != 1 or down_norms.shape[0] != D:
            raise ValueError(f"down_norms must have shape [D] = [{D}], got {tuple(down_norms.shape)}")
        down_norms = down_norms.to(torch.float32).contiguous()
    if mask is not None:
        mask = _tensor("mask", mask)
        if mask.dtype != torch.bool and mask.dtype not in _INT_LIKE:
            raise TypeError(f"mask must be a bool or integer tensor, got {mask.dtype}")
        if mask.device != h.device:
            raise ValueError(f"mask is on {mask.device} but h is on {h.device}")
        if tuple(mask.shape) != (B, T) and not (mask.dim() == 1 and mask.shape[0] == T and B == 1):
            raise ValueError(f"mask must have shape [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
        # nonzero -> 1 (a plain cast would wrap e.g. 256 to 0)
        mask = (mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0).to(torch.uint8)
        mask = mask.reshape(B, T).contiguous()
    if out is None:
        return torch.ops.glass.neuron_stats(h, down_norms, mask)
    out = _tensor("out", out)
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    if out.device != h.device:
        raise ValueError(f"out is on {out.device} but h is on {h.device}")
    if tuple(out.shape) != (B, D):
        raise ValueError(f"out must have shape [B, D] = [{B}, {D}], got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is accumulated into in place)")
    torch.ops.glass.neuron_stats_(h, down_norms, mask, out)
    return out


def select_neurons(local: Tensor, global_rank: Tensor, lam: float, k: int) -> Tensor:
    """GLASS selection: the k neurons with the smallest lam * r^G + (1 - lam) * r^L, int32 sorted ascending.

    local [B, D] (or [D]) scores, any float dtype, used as fp32, must be finite; global_rank [D]
    integer ranks in [1, D] (1 = most important); lam in [0, 1]; k in [1, D]. Ties: better
    local rank, then lower index. Returns int32 [B, k] (or [k] for 1-D local).
    """
    local = _tensor("local", local)
    if not local.is_floating_point():
        raise TypeError(f"local must be a floating tensor of scores, got {local.dtype}")
    squeeze = local.dim() == 1
    if squeeze:
        local = local.unsqueeze(0)
    if local.dim() != 2:
        raise ValueError(f"local must have shape [B, D] or [D], got {tuple(local.shape)}")
    D = local.shape[1]
    if D < 1:
        raise ValueError(f"local must have D >= 1, got shape {tuple(local.shape)}")
    global_rank = _tensor("global_rank", global_rank)
    if global_rank.dtype not in _INT_LIKE:
        raise TypeError(f"global_rank must be an integer tensor of ranks, got {global_rank.dtype}")
    if global_rank.device != local.device:
        raise ValueError(f"global_rank is on {global_rank.device} but local is on {local.device}")
    if global_rank.dim() != 1 or global_rank.shape[0] != D:
        raise ValueError(f"global_rank must have shape [D] = [{D}], got {tuple(global_rank.shape)}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a float in [0, 1], got {type(lam).__name__}")
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int in [1, D], got {type(k).__name__}")
    if not 1 <= k <= D:
        raise ValueError(f"k must be in [1, D] = [1, {D}], got {k}")
    local = local.to(torch.float32).contiguous()
    if global_rank.dtype != torch.int32 or not global_rank.is_contiguous():
        if torch.compiler.is_compiling():
            global_rank = global_rank.to(torch.int32).contiguous()  # checked by the op at run time
        else:
            lo, hi = _rank_values(global_rank, D)  # before narrowing, as for idx
            global_rank = global_rank.to(torch.int32).contiguous()
            _remember(global_rank, lo, hi)
    idx = torch.ops.glass.select_neurons(local, global_rank, lam, k)
    return idx[0] if squeeze else idx


# ---------------------------------------------------------------------------------------------
# fast path for the patch layer
# ---------------------------------------------------------------------------------------------

def _x_fast(x: Tensor, w: Tensor, idx: Tensor) -> tuple[int, int]:
    """Attribute-only checks of x that keep the core in bounds; returns (B, T)."""
    # is_cpu, not .device: building a torch.device costs ~1.3 us, a tenth of the whole fast path
    if x.dtype != w.dtype or not w.is_cpu or x.shape[-1] != w.shape[1] or not x.is_contiguous():
        _x_checked(x, w, w.shape[1], idx)  # raises the precise error
        raise ValueError("x must be contiguous for the prevalidated path")
    if x.dim() == 3:
        B, T = x.shape[0], x.shape[1]
    elif x.dim() == 2:
        B, T = 1, x.shape[0]
    else:
        raise ValueError(f"x must have shape [T, d] or [B, T, d], got {tuple(x.shape)}")
    if idx.dim() == 2 and idx.shape[0] != B:
        raise ValueError(f"idx has {idx.shape[0]} rows ([B, k]) but x has batch B = {B}")
    return B, T


def _fast_cpp_ok(x: Tensor) -> bool:
    # is_compiling() first: dynamo folds it to True and never traces the contextvar read
    return (not torch.compiler.is_compiling() and x.is_cpu and _ext._C is not None
            and _backend._current.get() in ("auto", "cpp"))


def sparse_ffn_prevalidated(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, idx: Tensor,
                            activation: str) -> Tensor:
    """``sparse_ffn`` for operands already checked by ``validate_sparse_ffn_operands``.

    idx must be the int32 contiguous tensor that function returned. Only x is checked (cheap
    attribute reads). Eager CPU with the extension: calls ``_C`` directly; otherwise the op.
    """
    if _fast_cpp_ok(x):
        _x_fast(x, w_gate, idx)
        return _cpp_sparse_ffn(x, w_gate, w_up, w_down_t, idx, activation)
    return torch.ops.glass.sparse_ffn(x.contiguous(), w_gate, w_up, w_down_t, idx, activation)


def sparse_mlp_prevalidated(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out_t: Tensor, b_out: Tensor | None,
                            idx: Tensor, activation: str) -> Tensor:
    """``sparse_mlp`` for operands already checked by ``validate_sparse_mlp_operands`` (see above)."""
    if _fast_cpp_ok(x):
        _x_fast(x, w_in, idx)
        return _cpp_sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, activation)
    return torch.ops.glass.sparse_mlp(x.contiguous(), w_in, b_in, w_out_t, b_out, idx, activation)
