"""One test per kind of bad input to the public ops: the exception type, and a message naming the
argument. All of these must be raised in Python, before any pointer reaches the C++ core."""

from __future__ import annotations

import pytest
import torch

import glass_kernels
from glass_kernels import ops

D, d = 12, 8


def _ffn():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(D, d, generator=g) for _ in range(3)]
    return torch.randn(2, 3, d, generator=g), *w, torch.tensor([0, 3, 5], dtype=torch.int32)


def _mlp():
    x, w_in, _, w_out, idx = _ffn()
    return x, w_in, torch.zeros(D), w_out, torch.zeros(d), idx


def _raises(exc, pattern, fn, *args, **kw):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kw)


# ---- sparse_ffn / sparse_mlp ----------------------------------------------------------------

def test_x_not_a_tensor():
    x, wg, wu, wd, idx = _ffn()
    _raises(TypeError, "x must be a torch.Tensor", ops.sparse_ffn, x.tolist(), wg, wu, wd, idx)


def test_weight_not_a_tensor():
    x, wg, wu, wd, idx = _ffn()
    _raises(TypeError, "w_up must be a torch.Tensor", ops.sparse_ffn, x, wg, None, wd, idx)


def test_unsupported_dtype():
    x, wg, wu, wd, idx = _ffn()
    _raises(TypeError, "w_gate must be float32, float16 or bfloat16", ops.sparse_ffn,
            x.double(), wg.double(), wu.double(), wd.double(), idx)


def test_weight_dtype_mismatch():
    x, wg, wu, wd, idx = _ffn()
    _raises(TypeError, "w_down_t has dtype torch.float16", ops.sparse_ffn, x, wg, wu, wd.half(), idx)


def test_x_dtype_mismatch():
    x, wg, wu, wd, idx = _ffn()
    _raises(TypeError, "x has dtype torch.bfloat16", ops.sparse_ffn, x.bfloat16(), wg, wu, wd, idx)


def test_weight_shape_mismatch():
    x, wg, wu, wd, idx = _ffn()
    _raises(ValueError, r"w_up must have shape \[D, d\]", ops.sparse_ffn, x, wg, wu[:-1], wd, idx)


def test_weight_rank():
    x, wg, wu, wd, idx = _ffn()
    _raises(ValueError, "w_gate must be 2-D", ops.sparse_ffn, x, wg.reshape(-1), wu, wd, idx)


def test_weight_rows_not_contiguous():
    x, wg, wu, wd, idx = _ffn()
    wt = torch.randn(d, D).t()  # [D, d] view whose rows are strided
    _raises(ValueError, r"w_down_t must be \[D, d\] with contiguous rows", ops.sparse_ffn, x, wg, wu, wt, idx)
    overlapping = torch.randn(D * d).as_strided((D, d), (d - 1, 1))  # rows closer than d apart
    _raises(ValueError, "w_gate must be .* contiguous rows", ops.sparse_ffn, x, overlapping, wu, wd, idx)


def test_weights_with_different_row_strides():
    x, wg, wu, wd, idx = _ffn()
    wide = torch.zeros(D, 2 * d)[:, :d].copy_(wu)  # rows 2d apart, gate's d apart
    _raises(ValueError, "w_up's rows are 16 elements apart but w_gate's are 8", ops.sparse_ffn, x, wg, wide, wd, idx)
    _raises(ValueError, "w_out_t's rows are 16 elements apart but w_in's are 8", ops.sparse_mlp,
            x, wg, None, wide, None, idx)


def test_x_rank_and_width():
    x, wg, wu, wd, idx = _ffn()
    _raises(ValueError, r"x must have shape \[T, d\] or \[B, T, d\]", ops.sparse_ffn, x[0, 0], wg, wu, wd, idx)
    _raises(ValueError, "x has last dimension 7", ops.sparse_ffn, x[..., :7], wg, wu, wd, idx)


def test_idx_dtype():
    x, wg, wu, wd, idx = _ffn()
    _raises(TypeError, "idx must be an int32 or int64", ops.sparse_ffn, x, wg, wu, wd, idx.float())


def test_idx_shape():
    x, wg, wu, wd, idx = _ffn()
    _raises(ValueError, r"idx must have shape \[k\] or \[B, k\]", ops.sparse_ffn, x, wg, wu, wd, idx.view(1, 1, 3))
    _raises(ValueError, "idx must select at least one neuron", ops.sparse_ffn, x, wg, wu, wd, idx[:0])


def test_idx_batch_mismatch():
    x, wg, wu, wd, idx = _ffn()
    _raises(ValueError, r"idx has 3 rows \(\[B, k\]\) but x has batch B = 2", ops.sparse_ffn,
            x, wg, wu, wd, idx.expand(3, 3).contiguous())


# 2**32 + 1 would wrap to 1 if int64 were narrowed to int32 before the range check
@pytest.mark.parametrize("bad,idt", [(-1, torch.int32), (D, torch.int32), (-1, torch.int64), (D, torch.int64),
                                     (2**32 + 1, torch.int64)])
def test_idx_out_of_range(bad, idt):
    x, wg, wu, wd, idx = _ffn()
    bad_idx = torch.tensor([0, bad, 2], dtype=idt)
    for backend in ("auto", "torch"):  # checked whatever the backend
        with glass_kernels.backend(backend):
            _raises(IndexError, r"idx values must be in \[0, D\)", ops.sparse_ffn, x, wg, wu, wd, bad_idx)


def test_activation_unknown():
    x, wg, wu, wd, idx = _ffn()
    _raises(ValueError, "activation must be one of", ops.sparse_ffn, x, wg, wu, wd, idx, "swish")


def test_device_mismatch():
    x, wg, wu, wd, idx = _ffn()
    _raises(ValueError, "w_up is on meta", ops.sparse_ffn, x, wg, wu.to("meta"), wd, idx)
    _raises(ValueError, "idx is on meta", ops.sparse_ffn, x, wg, wu, wd, idx.to("meta"))


def test_bias_shape_and_dtype():
    x, w_in, b_in, w_out, b_out, idx = _mlp()
    _raises(ValueError, r"b_in must have shape \[12\]", ops.sparse_mlp, x, w_in, b_in[:-1], w_out, b_out, idx)
    _raises(ValueError, r"b_out must have shape \[8\]", ops.sparse_mlp, x, w_in, b_in, w_out, b_in, idx)
    _raises(TypeError, "b_out has dtype torch.float16", ops.sparse_mlp, x, w_in, b_in, w_out, b_out.half(), idx)


def test_mlp_weight_names():
    x, w_in, b_in, w_out, b_out, idx = _mlp()
    _raises(ValueError, "w_out_t must have shape", ops.sparse_mlp, x, w_in, b_in, w_out[:, :-1], b_out, idx)


# ---- neuron_stats ---------------------------------------------------------------------------

def _h():
    return torch.randn(2, 3, D)


def test_h_dtype_and_rank():
    _raises(TypeError, "h must be float32, float16 or bfloat16", ops.neuron_stats, _h().double())
    _raises(ValueError, r"h must have shape \[B, T, D\]", ops.neuron_stats, torch.randn(D))


def test_down_norms_shape_and_dtype():
    _raises(ValueError, r"down_norms must have shape \[D\]", ops.neuron_stats, _h(), torch.ones(D + 1))
    _raises(TypeError, "down_norms must be a floating tensor", ops.neuron_stats, _h(), torch.ones(D, dtype=torch.int32))


def test_mask_shape_and_dtype():
    _raises(ValueError, r"mask must have shape \[B, T\]", ops.neuron_stats, _h(), None, torch.ones(3, 2, dtype=torch.bool))
    _raises(TypeError, "mask must be a bool or integer tensor", ops.neuron_stats, _h(), None, torch.ones(2, 3))


def test_out_checks():
    _raises(TypeError, "out must be float32", ops.neuron_stats, _h(), out=torch.zeros(2, D, dtype=torch.float64))
    _raises(ValueError, r"out must have shape \[B, D\]", ops.neuron_stats, _h(), out=torch.zeros(D))
    _raises(ValueError, "out must be contiguous", ops.neuron_stats, _h(), out=torch.zeros(D, 2).t())


def test_stats_device_mismatch():
    _raises(ValueError, "mask is on meta", ops.neuron_stats, _h(), None, torch.ones(2, 3, dtype=torch.bool, device="meta"))


# ---- select_neurons -------------------------------------------------------------------------

def _sel():
    return torch.randn(2, D), torch.randperm(D) + 1


def test_local_dtype_and_rank():
    local, grank = _sel()
    _raises(TypeError, "local must be a floating tensor", ops.select_neurons, local.long(), grank, 0.5, 3)
    _raises(ValueError, r"local must have shape \[B, D\] or \[D\]", ops.select_neurons, local[None], grank, 0.5, 3)


def test_local_not_finite():
    local, grank = _sel()
    local[1, 4] = float("nan")
    _raises(ValueError, "local scores must be finite", ops.select_neurons, local, grank, 0.5, 3)
    local[1, 4] = float("inf")
    _raises(ValueError, "local scores must be finite", ops.select_neurons, local, grank, 0.5, 3)


def test_global_rank_checks():
    local, grank = _sel()
    _raises(TypeError, "global_rank must be an integer tensor", ops.select_neurons, local, grank.float(), 0.5, 3)
    _raises(ValueError, r"global_rank must have shape \[D\]", ops.select_neurons, local, grank[:-1], 0.5, 3)
    _raises(ValueError, r"global_rank values must be ranks in \[1, D\]", ops.select_neurons, local, grank - 1, 0.5, 3)
    _raises(ValueError, r"global_rank values must be ranks in \[1, D\]", ops.select_neurons, local, grank + 1, 0.5, 3)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_lam_range(lam):
    local, grank = _sel()
    _raises(ValueError, r"lam must be in \[0, 1\]", ops.select_neurons, local, grank, lam, 3)


def test_lam_type():
    local, grank = _sel()
    _raises(TypeError, "lam must be a float", ops.select_neurons, local, grank, "0.5", 3)


@pytest.mark.parametrize("k", [0, D + 1])
def test_k_range(k):
    local, grank = _sel()
    _raises(ValueError, r"k must be in \[1, D\]", ops.select_neurons, local, grank, 0.5, k)


def test_k_type():
    local, grank = _sel()
    _raises(TypeError, "k must be an int", ops.select_neurons, local, grank, 0.5, 2.0)


# ---- backend ----------------------------------------------------------------------------------

def test_backend_unknown_name():
    _raises(ValueError, "backend must be one of", glass_kernels.backend, "cuda")
    _raises(ValueError, "backend must be one of", glass_kernels.backend.set, "fast")


def test_idx_rescanned_after_in_place_write():
    """The range scan is remembered per idx tensor, but an in-place write invalidates it."""
    x, wg, wu, wd, idx = _ffn()
    ops.sparse_ffn(x, wg, wu, wd, idx)
    idx[1] = D  # bumps the version counter
    _raises(IndexError, "idx values", ops.sparse_ffn, x, wg, wu, wd, idx)
    view = idx[:2]
    idx[1] = 1
    ops.sparse_ffn(x, wg, wu, wd, idx)
    view[0] = -1  # a write through a view shares the counter
    _raises(IndexError, "idx values", ops.sparse_ffn, x, wg, wu, wd, idx)
    ops_idx = torch.tensor([0, 3], dtype=torch.int32)
    ops.sparse_ffn(x[..., :d], wg, wu, wd, ops_idx)
    _raises(IndexError, r"\[0, 3\)", ops.sparse_ffn, x, wg[:3], wu[:3], wd[:3], ops_idx)  # smaller D


def test_idx_checked_under_inference_mode():
    x, wg, wu, wd, idx = _ffn()
    with torch.inference_mode():
        bad = torch.tensor([0, D], dtype=torch.int32)
        ops.sparse_ffn(x, wg, wu, wd, idx)
        _raises(IndexError, "idx values", ops.sparse_ffn, x, wg, wu, wd, bad)


@pytest.mark.parametrize("rank_dtype", [torch.int32, torch.int64])
def test_global_rank_rescanned_after_in_place_write(rank_dtype):
    local, grank = _sel()
    grank = grank.to(rank_dtype)
    ops.select_neurons(local, grank, 0.5, 3)
    grank[2] = 0
    _raises(ValueError, "global_rank values", ops.select_neurons, local, grank, 0.5, 3)
