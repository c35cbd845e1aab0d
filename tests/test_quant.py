"""Quantized neuron rows (glass_kernels.quant): the formats against ggml's reference rounding, and
sparse_ffn_q / sparse_mlp_q on every backend (torch reference, C++ on each ISA) against an fp64
oracle of the dequantized weights, with torch's own error in the activation dtype as the tolerance."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glass_kernels import _ext, quant, reference

import backends
from tolerances import assert_close_derived

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


@pytest.fixture(params=backends.names())
def impl(request):
    with backends.forced(request.param) as name:
        yield name


# ---- formats ------------------------------------------------------------------------------------

def _ggml_q8_0(block: list[float]) -> bytes:
    """ggml's quantize_row_q8_0_ref for one block, written from its definition in plain Python (fp32
    arithmetic through numpy): d = amax / 127, q = roundf(x / d) (half away from zero)."""
    x = np.asarray(block, dtype=np.float32)
    amax = np.float32(np.abs(x).max())
    d = np.float32(amax / np.float32(127.0))
    inv = np.float32(1.0) / d if d else np.float32(0.0)
    q = [int(math.copysign(math.floor(abs(float(np.float32(v * inv))) + 0.5), float(v))) for v in x]
    return np.float16(d).tobytes() + struct.pack("32b", *q)


def _ggml_q4_0(block: list[float]) -> bytes:
    """ggml's quantize_row_q4_0_ref for one block: max = the value of largest magnitude (the first),
    d = max / -8, q = min(15, (int8)(x / d + 8.5)), low nibbles values 0..15, high 16..31."""
    x = np.asarray(block, dtype=np.float32)
    mx = np.float32(x[int(np.argmax(np.abs(x)))])
    d = np.float32(mx / np.float32(-8.0))
    inv = np.float32(1.0) / d if d else np.float32(0.0)
    n = [min(15, int(np.float32(np.float32(v * inv) + np.float32(8.5)))) for v in x]
    return np.float16(d).tobytes() + bytes(n[j] | (n[16 + j] << 4) for j in range(16))


@pytest.mark.parametrize("wtype,ref", [("q8_0", _ggml_q8_0), ("q4_0", _ggml_q4_0)])
def test_quantize_is_ggml_byte_for_byte(wtype, ref, rng):
    w = torch.randn(5, 96, generator=rng) * torch.tensor([1e-3, 0.1, 1.0, 30.0, 0.0])[:, None]
    w[2, 40] = 7.5  # a block whose largest magnitude is positive (Q4_0 keeps the sign)
    w[3, 70] = -99.0
    q = quant.quantize(w, wtype)
    assert q.dtype == torch.uint8 and q.shape == (5, quant.row_bytes(wtype, 96))
    want = b"".join(ref(w[r, b * 32:(b + 1) * 32].tolist()) for r in range(5) for b in range(3))
    assert q.numpy().tobytes() == want


@pytest.mark.parametrize("wtype", quant.QTYPES)
def test_dequantize_round_trip_error(wtype, rng):
    w = torch.randn(64, 128, generator=rng)
    back = quant.dequantize(quant.quantize(w, wtype), wtype)
    amax = w.reshape(64, 4, 32).abs().amax(-1, keepdim=True)
    step = amax / (127.0 if wtype == "q8_0" else 8.0)  # one quantization step per block
    err = (back - w).reshape(64, 4, 32).abs()
    # half a step (Q4_0: a whole step, its codes -8..7 clamp the opposite extreme +8 to 7), plus the
    # stored fp16 scale's rounding (2^-11 relative) times the largest code
    qmax, steps = (127, 0.5) if wtype == "q8_0" else (8, 1.0)
    assert bool((err <= steps * step + qmax * step * 2.0 ** -11 + 1e-7).all())
    assert bool((err.mean() < 0.3 * step.mean()))  # and on average well inside it
    assert back.shape == w.shape and back.dtype == torch.float32


def test_format_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(torch.randn(4, 48), "q8_0")
    with pytest.raises(ValueError, match="wtype must be one of"):
        quant.quantize(torch.randn(4, 32), "q5_k")
    with pytest.raises(TypeError, match="floating-point"):
        quant.quantize(torch.ones(4, 32, dtype=torch.int32), "q8_0")
    with pytest.raises(TypeError, match="uint8"):
        quant.dequantize(torch.zeros(4, 35, dtype=torch.uint8), "q8_0")


# ---- the ops ------------------------------------------------------------------------------------

def _native(x, w1, w3, wo, b1, bo, idx, act, dtype):
    """The FFN over idx with every op in ``dtype`` (fp64: the oracle), from dequantized weights."""
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    ys = []
    for b in range(x3.shape[0]):
        r = (idx if idx.dim() == 1 else idx[b]).long()
        xb = x3[b].to(dtype)
        g = F.linear(xb, w1[r].to(dtype), None if b1 is None else b1[r].to(dtype))
        h = ACT[act](g) * F.linear(xb, w3[r].to(dtype)) if w3 is not None else ACT[act](g)
        ys.append(F.linear(h, wo[r].to(dtype).t(), None if bo is None else bo.to(dtype)))
    y = torch.stack(ys)
    return y.squeeze(0) if x.dim() == 2 else y


def _idx(rng, B, D, k, batched, dup=False):
    if dup:
        return torch.randint(0, D, (B, k) if batched else (k,), generator=rng).to(torch.int32)
    rows = [torch.randperm(D, generator=rng)[:k].sort().values for _ in range(B if batched else 1)]
    return (torch.stack(rows) if batched else rows[0]).to(torch.int32)


# (B or None for [T, d], T, d, D, k, batched, duplicates)
CASES = [
    (None, 1, 32, 1, 1, False, False),
    (None, 1, 64, 40, 40, False, False),
    (2, 3, 96, 33, 7, True, False),
    (1, 1, 160, 57, 20, False, False),
    (3, 2, 32, 19, 11, False, True),
]


def _fixed16(x):
    """x as the AVX2 / AVX-512 kernels multiply it by integer codes (csrc/src/quant_rows.inc): per
    block of 32 values, rounded half away from zero to a multiple of the block's max|x| / 32767."""
    xb = x.double().reshape(*x.shape[:-1], -1, 32)
    step = xb.abs().amax(-1, keepdim=True) / 32767
    q = torch.where(step > 0, xb / step.clamp_min(1e-300), torch.zeros_like(xb))
    return (torch.sign(q) * torch.floor(q.abs() + 0.5) * step).reshape(x.shape)


def _x_rounding(native, x):
    """Twice the exact effect of the fixed-point x on the fp64 result: the error the integer paths
    declare beyond fp32 rounding (the others never need it)."""
    return 2 * (native(_fixed16(x)) - native(x.double())).abs().max().item()


def _weights(rng, n, D, d, wtype):
    ws = [torch.randn(D, d, generator=rng) / d ** 0.5 for _ in range(n)]
    qs = [quant.quantize(w, wtype) for w in ws]
    return qs, [quant.dequantize(q, wtype) for q in qs]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}d{}D{}k{}{}{}".format(*c[:5], "b" if c[5] else "",
                                                                                     "dup" if c[6] else ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wtype", quant.QTYPES)
def test_sparse_ffn_q(impl, case, dtype, wtype, rng):
    B, T, d, D, k, batched, dup = case
    (qg, qu, qd), (wg, wu, wd) = _weights(rng, 3, D, d, wtype)
    x = torch.randn(*((T, d) if B is None else (B, T, d)), generator=rng).to(dtype)
    idx = _idx(rng, B or 1, D, k, batched, dup)
    y = quant.sparse_ffn_q(x, qg, qu, qd, idx, "silu", wtype)
    assert y.shape == x.shape and y.dtype == dtype
    oracle = _native(x, wg, wu, wd, None, None, idx, "silu", torch.float64)
    slack = _x_rounding(lambda v: _native(v, wg, wu, wd, None, None, idx, "silu", torch.float64), x)
    assert_close_derived(y, oracle, _native(x, wg, wu, wd, None, None, idx, "silu", dtype), f"sparse_ffn_q[{impl}]",
                         documented=slack)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wtype", quant.QTYPES)
def test_sparse_mlp_q(impl, dtype, wtype, rng):
    B, T, d, D, k = 2, 2, 64, 45, 17
    (qi, qo), (wi, wo) = _weights(rng, 2, D, d, wtype)
    b_in, b_out = torch.randn(D, generator=rng).to(dtype), torch.randn(d, generator=rng).to(dtype)
    x = torch.randn(B, T, d, generator=rng).to(dtype)
    idx = _idx(rng, B, D, k, True)
    y = quant.sparse_mlp_q(x, qi, b_in, qo, b_out, idx, "gelu", wtype)
    oracle = _native(x, wi, None, wo, b_in, b_out, idx, "gelu", torch.float64)
    slack = _x_rounding(lambda v: _native(v, wi, None, wo, b_in, b_out, idx, "gelu", torch.float64), x)
    assert_close_derived(y, oracle, _native(x, wi, None, wo, b_in, b_out, idx, "gelu", dtype), f"sparse_mlp_q[{impl}]",
                         documented=slack)


@pytest.mark.parametrize("wtype", quant.QTYPES)
def test_bundled_quantized_rows_give_the_same_bits(impl, wtype, rng):
    """Quantized rows as views of one neuron-bundled [D, 3, row_bytes] block: the same bits."""
    D, d = 30, 64
    (qg, qu, qd), _ = _weights(rng, 3, D, d, wtype)
    block = torch.stack([qg, qu, qd], dim=1)
    views = [block[:, j] for j in range(3)]
    assert views[0].stride(0) == 3 * quant.row_bytes(wtype, d)
    x, idx = torch.randn(1, 1, d, generator=rng), _idx(rng, 1, D, 12, False)
    assert torch.equal(quant.sparse_ffn_q(x, *views, idx, wtype=wtype), quant.sparse_ffn_q(x, qg, qu, qd, idx, wtype=wtype))


def test_cpp_paths_agree_and_name_their_kernel(rng):
    if not _ext.available():
        pytest.skip("C++ extension not available")
    (qg, qu, qd), _ = _weights(rng, 3, 50, 128, "q4_0")
    x, idx = torch.randn(1, 1, 128, generator=rng), _idx(rng, 1, 50, 25, False)
    outs = {}
    for isa in _ext.supported_isas():
        with _ext.isa(isa):
            assert quant.kernel_name("q4_0").split("__")[-1] in backends.kernel_isas(isa, "q4_0")
            outs[isa] = quant.sparse_ffn_q(x, qg, qu, qd, idx, wtype="q4_0")
    ref = reference.sparse_ffn_q(x, qg, qu, qd, idx, "silu", "q4_0")
    (wg, wu, wd) = (quant.dequantize(q, "q4_0") for q in (qg, qu, qd))
    slack = _x_rounding(lambda v: _native(v, wg, wu, wd, None, None, idx, "silu", torch.float64), x)
    for isa, y in outs.items():
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 + slack, msg=isa)


def test_bad_input_is_named():
    qg = quant.quantize(torch.randn(8, 64), "q8_0")
    x, idx = torch.randn(1, 1, 64), torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(TypeError, match="w_up must be uint8"):
        quant.sparse_ffn_q(x, qg, torch.randn(8, 64), qg, idx)
    with pytest.raises(ValueError, match=r"w_down_t must have shape \[8, 68\]"):
        quant.sparse_ffn_q(x, qg, qg, qg[:, :34], idx)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.sparse_ffn_q(torch.randn(1, 1, 48), qg, qg, qg, idx)
    with pytest.raises(ValueError, match="wtype must be one of"):
        quant.sparse_ffn_q(x, qg, qg, qg, idx, wtype="q2_k")
    with pytest.raises(IndexError):
        quant.sparse_ffn_q(x, qg, qg, qg, torch.tensor([0, 8], dtype=torch.int32))
    wide = torch.zeros(8, 2 * 68, dtype=torch.uint8)[:, :68]
    with pytest.raises(ValueError, match="same row stride"):
        quant.sparse_ffn_q(x, qg, wide, qg, idx)
    with pytest.raises(ValueError, match="whole number of 34-byte blocks"):
        quant.sparse_ffn_q(x, torch.zeros(8 * 70, dtype=torch.uint8).as_strided((8, 68), (70, 1)), qg, qg, idx)
    with pytest.raises(ValueError, match=r"b_in must have shape \[8\]"):
        quant.sparse_mlp_q(x, qg, torch.zeros(5), qg, None, idx)


@pytest.mark.parametrize("name", ["sparse_ffn_q", "sparse_mlp_q"])
def test_opcheck(name, rng):
    (qa, qb, qc), _ = _weights(rng, 3, 12, 32, "q8_0")
    x, idx = torch.randn(2, 3, 32, generator=rng), _idx(rng, 2, 12, 5, True)
    args = ((x, qa, qb, qc, idx, "silu", "q8_0") if name == "sparse_ffn_q"
            else (x, qa, torch.randn(12, generator=rng), qb, None, idx, "gelu", "q8_0"))
    torch.library.opcheck(getattr(torch.ops.glass, name).default, args)
