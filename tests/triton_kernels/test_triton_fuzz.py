"""Property-based fuzzing of the Triton sparse_ffn / sparse_mlp (hypothesis), as tests/test_fuzz_ops.py
does for the other backends: random odd sizes, k = 1 / k = D, batched or shared index sets with
duplicates, dtypes, activations, NaN / Inf in x. Few examples: each interpreted launch costs tens of
milliseconds on CPU (on a GPU the same file runs compiled)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracles
from glass_kernels.triton import sparse_ffn as triton_sparse_ffn
from glass_kernels.triton import sparse_mlp as triton_sparse_mlp

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def problem(draw):
    d = draw(st.integers(1, 40))
    D = draw(st.integers(1, 48))
    return dict(d=d, D=D, k=draw(st.one_of(st.just(1), st.just(D), st.integers(1, D))),
                B=draw(st.integers(1, 2)), T=draw(st.integers(1, 3)),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                act=draw(st.sampled_from(["silu", "gelu_tanh", "gelu", "relu"])),
                gated=draw(st.booleans()), batched=draw(st.booleans()), duplicates=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def _make(p, device):
    g = torch.Generator().manual_seed(p["seed"])
    d, D, k, B, dtype = p["d"], p["D"], p["k"], p["B"], p["dtype"]
    x = torch.randn(B, p["T"], d, generator=g).to(dtype)
    ws = [(torch.randn(D, d, generator=g) / d ** 0.5).to(dtype) for _ in range(3)]
    shape = (B, k) if p["batched"] else (k,)
    if p["duplicates"]:
        idx = torch.randint(0, D, shape, generator=g, dtype=torch.int32)
    else:
        rows = [torch.randperm(D, generator=g)[:k].sort().values for _ in range(B if p["batched"] else 1)]
        idx = (torch.stack(rows) if p["batched"] else rows[0]).to(torch.int32)
    b_in = torch.randn(D, generator=g).to(dtype)
    b_out = torch.randn(d, generator=g).to(dtype)
    return [t.to(device) for t in (x, *ws, idx, b_in, b_out)]


def _run(p, x, w1, w3, wo, idx, b_in, b_out):
    if p["gated"]:
        return triton_sparse_ffn(x, w1, w3, wo, idx, p["act"])
    return triton_sparse_mlp(x, w1, b_in, wo, b_out, idx, p["act"])


@FUZZ
@given(p=problem())
def test_triton_matches_the_oracle(p, device):
    x, w1, w3, wo, idx, b_in, b_out = _make(p, device)
    y = _run(p, x, w1, w3, wo, idx, b_in, b_out)
    args = (w1, w3, wo, None, None) if p["gated"] else (w1, None, wo, b_in, b_out)
    oracle = oracles.ffn(x, *args, idx, p["act"], torch.float64)
    native = oracles.ffn(x, *args, idx, p["act"], p["dtype"])
    oracles.check(y, oracle, native, f"triton {p}")


@FUZZ
@given(p=problem(), special=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       where=st.integers(0, 10**6))
def test_triton_non_finite_inputs_match_torch(p, special, where, device):
    x, w1, w3, wo, idx, b_in, b_out = _make(p, device)
    x.view(-1)[where % x.numel()] = special
    y = _run(p, x, w1, w3, wo, idx, b_in, b_out)
    args = (w1, w3, wo, None, None) if p["gated"] else (w1, None, wo, b_in, b_out)
    native = oracles.ffn(x, *args, idx, p["act"], p["dtype"])
    assert torch.equal(torch.isfinite(y), torch.isfinite(native)), (p, special)
