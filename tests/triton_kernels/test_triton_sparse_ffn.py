"""Triton sparse_ffn / sparse_mlp against an fp64 oracle, with torch's own error as the tolerance.

Shapes are small and odd (d = 37 spans two masked BLOCK_D chunks of the interpreter config) and
few: each interpreted launch costs tens to hundreds of ms on CPU.
"""

import sys

import pytest
import torch

import oracles
from glass_kernels.triton import sparse_ffn as triton_sparse_ffn
from glass_kernels.triton import sparse_mlp as triton_sparse_mlp
from glass_kernels.triton.sparse_ffn import _plan

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ops_layer():
    """(glass_kernels, ops, reference) once the ops layer (issue 2) exists, else None."""
    try:
        import glass_kernels
        from glass_kernels import ops, reference
    except ImportError:
        return None
    return glass_kernels, ops, reference


OPS = _ops_layer()


def _idx(B, D, k, batched, gen, device):
    rows = [torch.randperm(D, generator=gen)[:k].sort().values for _ in range(B if batched else 1)]
    idx = torch.stack(rows) if batched else rows[0]
    return idx.to(torch.int32).to(device)


def _weights(n, D, d, dtype, gen, device):
    # 1/sqrt(d) scaling keeps fp16 activations in range, as in a trained model
    return [(torch.randn(D, d, generator=gen) / d ** 0.5).to(dtype).to(device) for _ in range(n)]


# (B, T, d, D, k, idx batched, activation): k = D, k = 1, odd d, T = 1 and T > 1, token tiles
# of 1, 4, 8 and 16 (T = 17: the tl.dot path, two tiles), k = D = 96 (one program walking six
# 16-neuron blocks: the read-add-write of its partial row), a batch sharing one idx.
GATED_CASES = [
    (1, 1, 37, 40, 40, False, "silu"),
    (1, 1, 37, 40, 1, False, "gelu_tanh"),
    (2, 3, 37, 40, 7, True, "gelu"),
    (1, 17, 21, 24, 13, False, "relu"),
    (2, 2, 19, 96, 96, True, "silu"),
    (3, 2, 37, 40, 11, False, "gelu_tanh"),  # shared idx over a batch: folded into 6 tokens
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GATED_CASES, ids=lambda c: "B{}T{}d{}D{}k{}{}-{}".format(
    *c[:5], "b" if c[5] else "", c[6]))
def test_sparse_ffn_matches_oracle(case, dtype, device):
    B, T, d, D, k, batched, act = case
    gen = torch.Generator().manual_seed(1000 + d + k)
    x = torch.randn(B, T, d, generator=gen).to(dtype).to(device)
    w_gate, w_up, w_down_t = _weights(3, D, d, dtype, gen, device)
    idx = _idx(B, D, k, batched, gen, device)
    y = triton_sparse_ffn(x, w_gate, w_up, w_down_t, idx, act)
    assert y.dtype == dtype and y.device == x.device
    oracle = oracles.ffn(x, w_gate, w_up, w_down_t, None, None, idx, act, torch.float64)
    native = oracles.ffn(x, w_gate, w_up, w_down_t, None, None, idx, act, dtype)
    oracles.check(y, oracle, native, f"sparse_ffn {case} {dtype}")
    if OPS is not None:
        glass_kernels, ops, reference = OPS
        with glass_kernels.backend("triton"):  # validation + custom-op dispatch, same kernel
            assert torch.equal(ops.sparse_ffn(x, w_gate, w_up, w_down_t, idx, activation=act), y)
        # the reference is the semantics' owner: it must agree with this file's oracle
        ref = reference.sparse_ffn(x, w_gate, w_up, w_down_t, idx, act)
        oracles.check(ref, oracle, native, f"reference.sparse_ffn {case} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [GATED_CASES[2], GATED_CASES[3]], ids=["B2T3-perseq", "T17-dot"])
def test_bundled_rows_give_the_same_bits(case, dtype, device):
    """Weights as the views of one neuron-bundled [D, 3, d] block (row stride 3d, the kernel's ldw)
    read the same values as contiguous tensors: the same bits."""
    B, T, d, D, k, batched, act = case
    gen = torch.Generator().manual_seed(2000 + d + k)
    x = torch.randn(B, T, d, generator=gen).to(dtype).to(device)
    ws = _weights(3, D, d, dtype, gen, device)
    block = torch.stack(ws, dim=1)  # [D, 3, d]
    views = [block[:, j] for j in range(3)]
    assert views[0].stride() == (3 * d, 1)
    idx = _idx(B, D, k, batched, gen, device)
    assert torch.equal(triton_sparse_ffn(x, *views, idx, act), triton_sparse_ffn(x, *ws, idx, act))


MLP_CASES = [
    (1, 1, 37, 40, 40, False, "gelu", True),
    (2, 3, 37, 40, 5, True, "relu", True),
    (2, 2, 37, 40, 1, False, "gelu_tanh", False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: "B{}T{}d{}D{}k{}{}-{}-{}".format(
    *c[:5], "b" if c[5] else "", c[6], "bias" if c[7] else "nobias"))
def test_sparse_mlp_matches_oracle(case, dtype, device):
    B, T, d, D, k, batched, act, bias = case
    gen = torch.Generator().manual_seed(2000 + d + k)
    x = torch.randn(B, T, d, generator=gen).to(dtype).to(device)
    w_in, w_out_t = _weights(2, D, d, dtype, gen, device)
    b_in = torch.randn(D, generator=gen).to(dtype).to(device) if bias else None
    b_out = torch.randn(d, generator=gen).to(dtype).to(device) if bias else None
    idx = _idx(B, D, k, batched, gen, device)
    y = triton_sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, act)
    assert y.dtype == dtype
    oracle = oracles.ffn(x, w_in, None, w_out_t, b_in, b_out, idx, act, torch.float64)
    native = oracles.ffn(x, w_in, None, w_out_t, b_in, b_out, idx, act, dtype)
    oracles.check(y, oracle, native, f"sparse_mlp {case} {dtype}")
    if OPS is not None:
        glass_kernels, ops, reference = OPS
        with glass_kernels.backend("triton"):
            assert torch.equal(ops.sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, activation=act), y)
        ref = reference.sparse_mlp(x, w_in, b_in, w_out_t, b_out, idx, act)
        oracles.check(ref, oracle, native, f"reference.sparse_mlp {case} {dtype}")


def test_sparse_ffn_2d_input_and_duplicate_indices(device):
    # [T, d] input keeps its shape; a duplicated index counts once per occurrence (architecture.md)
    gen = torch.Generator().manual_seed(7)
    T, d, D = 2, 37, 40
    x = torch.randn(T, d, generator=gen).to(device)
    w_gate, w_up, w_down_t = _weights(3, D, d, torch.float32, gen, device)
    idx = torch.tensor([3, 3, 17, 39], dtype=torch.int32, device=device)
    y = triton_sparse_ffn(x, w_gate, w_up, w_down_t, idx, "silu")
    assert y.shape == (T, d)
    oracle = oracles.ffn(x, w_gate, w_up, w_down_t, None, None, idx, "silu", torch.float64)
    native = oracles.ffn(x, w_gate, w_up, w_down_t, None, None, idx, "silu", torch.float32)
    oracles.check(y, oracle, native, "sparse_ffn [T, d] with duplicates")


def test_plan_covers_both_reduction_paths():
    # The cases above must exercise a split over several programs (second kernel sums > 1 row)
    # and a program walking several neuron blocks (read-add-write of its own partial row).
    cpu = torch.device("cpu")
    split = _plan(1, 1, 37, 40, cpu)
    assert split["n_split"] > 1
    walk = _plan(2, 2, 19, 96, cpu)
    assert walk["npp"] > 16 and walk["n_split"] == 1
    assert _plan(1, 17, 21, 13, cpu)["USE_DOT"] and _plan(1, 17, 21, 13, cpu)["n_t"] == 2


def test_deterministic(device):
    # The reduction has a fixed order: two runs are bit-identical.
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 1, 37, generator=gen).to(torch.bfloat16).to(device)
    w = _weights(3, 40, 37, torch.bfloat16, gen, device)
    idx = _idx(1, 40, 40, False, gen, device)
    assert torch.equal(triton_sparse_ffn(x, *w, idx, "silu"), triton_sparse_ffn(x, *w, idx, "silu"))


@pytest.mark.parametrize("block_k,block_d,T", [(16, 64, 1), (32, 128, 1), (16, 512, 3), (32, 64, 17)])
def test_gpu_tile_sizes_under_interpreter(block_k, block_d, T, monkeypatch, device):
    # The interpreter normally runs one small fixed tile; these are tiles of the GPU autotune lists
    # (bcast_configs / DOT_CONFIGS), so the index arithmetic of the compiled configs is checked too.
    if device.type == "cuda":
        pytest.skip("on CUDA the autotuned configs themselves run in the tests above")
    mod = sys.modules["glass_kernels.triton.sparse_ffn"]
    monkeypatch.setattr(mod, "_INTERP_BLOCK_K", block_k)
    monkeypatch.setattr(mod, "_INTERP_BLOCK_D", block_d)
    gen = torch.Generator().manual_seed(block_k + block_d + T)
    d, D, k = 200, 100, 70
    x = torch.randn(1, T, d, generator=gen).to(torch.bfloat16)
    w = _weights(3, D, d, torch.bfloat16, gen, device)
    idx = _idx(1, D, k, False, gen, device)
    y = triton_sparse_ffn(x, *w, idx, "silu")
    oracle = oracles.ffn(x, *w, None, None, idx, "silu", torch.float64)
    native = oracles.ffn(x, *w, None, None, idx, "silu", torch.bfloat16)
    oracles.check(y, oracle, native, f"sparse_ffn tile ({block_k}, {block_d}) T={T}")
