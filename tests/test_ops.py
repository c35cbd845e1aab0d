"""glass_kernels.ops against the pure-torch reference and fp64 oracles (issue 2, point 4).

Every dispatched path is checked: the C++ core on each ISA this CPU supports (skipped with the
reason when the extension is missing) and the torch reference. Tolerances follow the one rule in
tolerances.assert_close_derived: at most ~2x plain torch's own error in the same dtype (computed
against the same fp64 oracle), plus a tiny epsilon. select_neurons is integer-valued: exact.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import glass_kernels
from glass_kernels import _ext, ops, reference
from glass_kernels.ffn.layout import bundled_views

import backends
from tolerances import assert_close_derived

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTS = ["silu", "gelu_tanh", "gelu", "relu"]
TORCH_ACT = {
    "silu": F.silu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def _impl_params():
    params = [pytest.param("torch", id="torch")]
    isas = _ext.supported_isas()
    if isas:
        params += [pytest.param(f"cpp:{i}", id=f"cpp-{i}") for i in isas]
    else:
        params.append(pytest.param("cpp:none", id="cpp", marks=pytest.mark.skip(
            reason=f"C++ extension not available ({_ext.load_error()})")))
    return params


@pytest.fixture(params=_impl_params())
def impl(request):
    """Forces one path: the torch reference, or the C++ core on one ISA."""
    with backends.forced(request.param) as name:
        yield name


# ---------------------------------------------------------------------------------------------
# oracles / torch-native baselines
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _one_thread():
    """Oracles run single-threaded: these tiny matmuls are slower with 2 OpenMP threads on a
    shared 2-core machine (spin-waiting, measured 0.36 s vs 0.4 ms per call), while the op under
    test keeps torch's thread count (the C++ core follows it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _rows(idx, b):
    return (idx[b] if idx.dim() == 2 else idx).long()


def native_ffn(x, w1, w3, wo, b1, bo, idx, activation, dtype):
    """The FFN over the neurons idx with every op in ``dtype`` (HF-style F.linear on a compacted
    copy). dtype=float64 is the oracle; dtype=x.dtype is torch's own result in that precision."""
    act = TORCH_ACT[activation]
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    ys = []
    with _one_thread():
        for b in range(x3.shape[0]):
            r = _rows(idx, b)
            xb = x3[b].to(dtype)
            g = F.linear(xb, w1[r].to(dtype), None if b1 is None else b1[r].to(dtype))
            h = act(g) * F.linear(xb, w3[r].to(dtype)) if w3 is not None else act(g)
            ys.append(F.linear(h, wo[r].to(dtype).t(), None if bo is None else bo.to(dtype)))
    y = torch.stack(ys)
    return y.squeeze(0) if x.dim() == 2 else y


def native_stats(h, down_norms, mask, dtype):
    """Sum over kept tokens of (v / ||v||)^2 with every op in ``dtype``, [B, D]."""
    with _one_thread():
        return _native_stats(h, down_norms, mask, dtype)


def _native_stats(h, down_norms, mask, dtype):
    h3 = h.unsqueeze(0) if h.dim() == 2 else h
    v = h3.to(dtype)
    if down_norms is not None:
        v = v * down_norms.to(dtype)
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    q = torch.where(n > 0, (v / torch.where(n > 0, n, torch.ones_like(n))) ** 2, torch.zeros_like(v))
    if mask is not None:
        q = q * (mask.reshape(q.shape[:2]) != 0).to(dtype)[..., None]
    return q.sum(dim=1)


def brute_select(local_row, global_rank, lam, k):
    """Selection from the definition, in Python floats (IEEE double, each product rounded)."""
    vals = local_row.tolist()
    D = len(vals)
    by_score = sorted(range(D), key=lambda i: (-vals[i], i))
    rl = [0] * D
    for r, i in enumerate(by_score, start=1):
        rl[i] = r
    rg = [int(v) for v in global_rank.tolist()]
    a = [lam * rg[i] + (1.0 - lam) * rl[i] for i in range(D)]
    chosen = sorted(range(D), key=lambda i: (a[i], rl[i], i))[:k]
    return sorted(chosen)


def _weights(rng, D, d, dtype, n=3):
    # scaled so that every intermediate stays O(1) (fp16 cannot overflow)
    return [(torch.randn(D, d, generator=rng) / d ** 0.5).to(dtype) for _ in range(n)]


def _idx(rng, B, D, k, batched, dtype=torch.int32, duplicates=False):
    if duplicates:
        shape = (B, k) if batched else (k,)
        return torch.randint(0, D, shape, generator=rng).to(dtype)
    if batched:
        return torch.stack([torch.randperm(D, generator=rng)[:k].sort().values for _ in range(B)]).to(dtype)
    return torch.randperm(D, generator=rng)[:k].sort().values.to(dtype)


# (name, B or None for [T, d] input, T, d, D, k, idx batched, idx dtype, duplicates)
FFN_CASES = [
    ("d1_D1_k1_T1_2d", None, 1, 1, 1, 1, False, torch.int32, False),
    ("d7_D33_k1_T1_2d", None, 1, 7, 33, 1, False, torch.int64, False),
    ("d33_D129_kD_B2T3_shared", 2, 3, 33, 129, 129, False, torch.int32, False),
    ("d129_D67_k20_B3T1_perseq", 3, 1, 129, 67, 20, True, torch.int32, False),
    ("d64_D95_k37_B2T5_perseq_int64", 2, 5, 64, 95, 37, True, torch.int64, False),
    ("d17_D40_k9_T4_2d_perseq1", None, 4, 17, 40, 9, True, torch.int32, False),
    ("d24_D31_k12_B2T2_duplicates", 2, 2, 24, 31, 12, True, torch.int32, True),
]


@pytest.mark.parametrize("case", FFN_CASES, ids=[c[0] for c in FFN_CASES])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_ffn(impl, case, activation, dtype, rng):
    _, B, T, d, D, k, batched, idt, dup = case
    wg, wu, wd = _weights(rng, D, d, dtype)
    x = torch.randn(*((T, d) if B is None else (B, T, d)), generator=rng).to(dtype)
    idx = _idx(rng, 1 if B is None else B, D, k, batched, idt, dup)
    y = ops.sparse_ffn(x, wg, wu, wd, idx, activation)
    assert y.shape == x.shape and y.dtype == dtype
    oracle = native_ffn(x, wg, wu, wd, None, None, idx, activation, torch.float64)
    torch_same = native_ffn(x, wg, wu, wd, None, None, idx, activation, dtype)
    assert_close_derived(y, oracle, torch_same, f"sparse_ffn[{impl}]")
    ref = reference.sparse_ffn(x, wg, wu, wd, idx, activation)
    assert_close_derived(ref, oracle, torch_same, "reference.sparse_ffn")


# each non-gated case carries one bias variant, so every variant meets every dtype and activation
MLP_CASES = list(zip(FFN_CASES[:4] + FFN_CASES[6:], ["none", "in", "out", "both", "both"]))


@pytest.mark.parametrize("case,bias", MLP_CASES, ids=[f"{c[0]}-bias_{b}" for c, b in MLP_CASES])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_mlp(impl, case, bias, activation, dtype, rng):
    _, B, T, d, D, k, batched, idt, dup = case
    w_in, w_out = _weights(rng, D, d, dtype, 2)
    b_in = torch.randn(D, generator=rng).to(dtype) if bias in ("in", "both") else None
    b_out = torch.randn(d, generator=rng).to(dtype) if bias in ("out", "both") else None
    x = torch.randn(*((T, d) if B is None else (B, T, d)), generator=rng).to(dtype)
    idx = _idx(rng, 1 if B is None else B, D, k, batched, idt, dup)
    y = ops.sparse_mlp(x, w_in, b_in, w_out, b_out, idx, activation)
    assert y.shape == x.shape and y.dtype == dtype
    oracle = native_ffn(x, w_in, None, w_out, b_in, b_out, idx, activation, torch.float64)
    torch_same = native_ffn(x, w_in, None, w_out, b_in, b_out, idx, activation, dtype)
    assert_close_derived(y, oracle, torch_same, f"sparse_mlp[{impl}]")
    assert_close_derived(reference.sparse_mlp(x, w_in, b_in, w_out, b_out, idx, activation), oracle,
                         torch_same, "reference.sparse_mlp")


@pytest.mark.parametrize("case", [FFN_CASES[i] for i in (0, 2, 3, 6)], ids=[FFN_CASES[i][0] for i in (0, 2, 3, 6)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bundled_rows_read_the_same_values(impl, case, dtype, rng):
    """Weights given as the views of one neuron-bundled [D, n, d] block (row stride n d) give the
    same bits as the same values in contiguous tensors: only the addresses differ."""
    _, B, T, d, D, k, batched, idt, dup = case
    x = torch.randn(*((T, d) if B is None else (B, T, d)), generator=rng).to(dtype)
    idx = _idx(rng, 1 if B is None else B, D, k, batched, idt, dup)
    ws = _weights(rng, D, d, dtype)
    bundled = bundled_views(ws)
    assert bundled[0].stride() == (3 * d, 1) and ops.row_stride(bundled[2]) == 3 * d
    torch.testing.assert_close(ops.sparse_ffn(x, *bundled, idx), ops.sparse_ffn(x, *ws, idx), rtol=0, atol=0)
    b_in, b_out = torch.randn(D, generator=rng).to(dtype), torch.randn(d, generator=rng).to(dtype)
    w_in, w_out = bundled_views(ws[:2])
    torch.testing.assert_close(ops.sparse_mlp(x, w_in, b_in, w_out, b_out, idx, "gelu"),
                               ops.sparse_mlp(x, ws[0], b_in, ws[1], b_out, idx, "gelu"), rtol=0, atol=0)


def test_sparse_ffn_noncontiguous_x_and_shared_vs_batched(impl, rng):
    """A non-contiguous x is accepted (made contiguous); idx [k] == the same set repeated as [B, k]."""
    B, T, d, D, k = 3, 2, 21, 50, 13
    wg, wu, wd = _weights(rng, D, d, torch.float32)
    xt = torch.randn(B, d, T, generator=rng).transpose(1, 2)
    assert not xt.is_contiguous()
    idx = _idx(rng, 1, D, k, False)
    y1 = ops.sparse_ffn(xt, wg, wu, wd, idx)
    y2 = ops.sparse_ffn(xt.contiguous(), wg, wu, wd, idx.expand(B, k).contiguous())
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # same neurons, same order: same sums
    oracle = native_ffn(xt, wg, wu, wd, None, None, idx, "silu", torch.float64)
    assert_close_derived(y1, oracle, native_ffn(xt, wg, wu, wd, None, None, idx, "silu", torch.float32))


def test_sparse_ffn_empty_tokens(impl, rng):
    wg, wu, wd = _weights(rng, 8, 4, torch.float32)
    x = torch.empty(2, 0, 4)
    y = ops.sparse_ffn(x, wg, wu, wd, torch.arange(3, dtype=torch.int32))
    assert y.shape == (2, 0, 4)


# ---------------------------------------------------------------------------------------------
# neuron_stats
# ---------------------------------------------------------------------------------------------

STATS_CASES = [  # (name, B or None for [T, D], T, D, mask kind)
    ("T1_D1", 1, 1, 1, "none"),
    ("2d_T5_D33", None, 5, 33, "none"),
    ("2d_T6_D20_mask", None, 6, 20, "bool"),
    ("B3_T4_D129_boolmask", 3, 4, 129, "bool"),
    ("B2_T7_D67_intmask", 2, 7, 67, "int64"),
    ("B2_T3_D31", 2, 3, 31, "none"),
]


def _mask(rng, B, T, kind):
    if kind == "none":
        return None
    m = torch.rand(B, T, generator=rng) > 0.3
    m[0, -1] = False  # a padding token in the first row
    if B > 1:
        m[-1] = False  # a whole padding row: its statistic stays zero
    if kind == "int64":
        return m.to(torch.int64) * 3  # any nonzero counts
    return m


@pytest.mark.parametrize("case", STATS_CASES, ids=[c[0] for c in STATS_CASES])
@pytest.mark.parametrize("impact", [False, True], ids=["activation", "impact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neuron_stats(impl, case, impact, dtype, rng):
    _, B, T, D, mask_kind = case
    shape = (T, D) if B is None else (B, T, D)
    h = torch.randn(*shape, generator=rng).to(dtype)
    Bm = 1 if B is None else B
    if T > 1:
        h.view(Bm, T, D)[0, 0] = 0  # a zero token adds nothing (n == 0)
    down_norms = torch.rand(D, generator=rng) + 0.5 if impact else None
    mask = _mask(rng, Bm, T, mask_kind)
    s = ops.neuron_stats(h, down_norms, mask)
    assert s.shape == (Bm, D) and s.dtype == torch.float32
    oracle = native_stats(h, down_norms, mask, torch.float64)
    torch_same = native_stats(h, down_norms, mask, dtype)
    assert_close_derived(s, oracle, torch_same, f"neuron_stats[{impl}]")
    assert_close_derived(reference.neuron_stats(h, down_norms, mask), oracle, torch_same, "reference.neuron_stats")
    if mask is not None and Bm > 1:
        assert torch.all(s[-1] == 0), "a fully masked row must stay zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neuron_stats_accumulates_chunked_equals_one_shot(impl, dtype, rng):
    B, T, D = 2, 9, 45
    h = torch.randn(B, T, D, generator=rng).to(dtype)
    mask = _mask(rng, B, T, "bool")
    mask[-1, :4] = True  # the last row counts a few tokens here
    dn = torch.rand(D, generator=rng) + 0.1
    out = torch.full((B, D), 0.25)  # accumulation adds to what is there
    ret = ops.neuron_stats(h[:, :4], dn, mask[:, :4], out=out)
    assert ret is out
    ops.neuron_stats(h[:, 4:], dn, mask[:, 4:], out=out)
    one_shot = ops.neuron_stats(h, dn, mask)
    oracle = native_stats(h, dn, mask, torch.float64) + 0.25
    torch_same = native_stats(h, dn, mask, dtype).double() + 0.25
    assert_close_derived(out, oracle, torch_same, "chunked")
    assert_close_derived(one_shot + 0.25, oracle, torch_same, "one shot")


# ---------------------------------------------------------------------------------------------
# select_neurons (integer results: exact)
# ---------------------------------------------------------------------------------------------

def _check_select(local, grank, lam, k):
    idx = ops.select_neurons(local, grank, lam, k)
    ref = reference.select_neurons(local, grank, lam, k)
    assert idx.dtype == torch.int32
    assert torch.equal(idx, ref), f"ops {idx.tolist()} != reference {ref.tolist()}"
    rows = local.unsqueeze(0) if local.dim() == 1 else local
    got = idx.unsqueeze(0) if local.dim() == 1 else idx
    for b in range(rows.shape[0]):
        assert got[b].tolist() == brute_select(rows[b].float(), grank, float(lam), k)
    return idx


SELECT_CASES = [(1, 1, 1), (1, 7, 1), (2, 33, 33), (3, 129, 20), (2, 67, 66), (4, 40, 13)]  # (B, D, k)


@pytest.mark.parametrize("B,D,k", SELECT_CASES)
def test_select_neurons_random(impl, B, D, k, rng):
    local = torch.randn(B, D, generator=rng)
    grank = torch.randperm(D, generator=rng) + 1
    for lam in (0.0, 0.1, 0.25, 0.5, 0.7, 1.0, 1.0 / 3.0):
        _check_select(local, grank, lam, k)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_select_neurons_ties(impl, lam, rng):
    """Heavy ties in local scores (quantised, incl. +0.0 / -0.0) and in aggregated scores."""
    B, D = 3, 61
    levels = torch.tensor([-1.0, -0.0, 0.0, 0.5, 2.0])
    local = levels[torch.randint(0, len(levels), (B, D), generator=rng)]
    # lam = 0.5 with a reversed global ranking makes many a(i) equal (r^G + r^L = const)
    grank = (torch.arange(D, 0, -1) if lam == 0.5 else torch.randperm(D, generator=rng) + 1).to(torch.int64)
    for k in (1, 10, 30, D):
        _check_select(local, grank, lam, k)


def test_select_neurons_lam_extremes(impl, rng):
    B, D, k = 2, 77, 19
    local = torch.randn(B, D, generator=rng)
    grank = torch.randperm(D, generator=rng) + 1
    # lam = 0: exactly the local top-k (ties to the lower index), sorted ascending
    top_local = torch.sort(local, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
    assert torch.equal(ops.select_neurons(local, grank, 0.0, k), top_local.to(torch.int32))
    # lam = 1: exactly the global top-k, the same for every row
    top_global = torch.argsort(grank)[:k].sort().values.to(torch.int32)
    got = ops.select_neurons(local, grank, 1.0, k)
    assert torch.equal(got, top_global.expand(B, k))


def test_select_neurons_1d_and_dtypes(impl, rng):
    D, k = 50, 11
    local = torch.randn(D, generator=rng)
    grank = (torch.randperm(D, generator=rng) + 1).to(torch.int32)
    idx = _check_select(local, grank, 0.4, k)
    assert idx.shape == (k,)
    # local in bf16 is used as fp32 (exact upcast), global_rank int64 as int32
    lb = local.to(torch.bfloat16)
    assert torch.equal(ops.select_neurons(lb, grank.long(), 0.4, k),
                       reference.select_neurons(lb.float(), grank, 0.4, k))


def test_select_neurons_global_rank_with_ties(impl, rng):
    """global_rank need not be a permutation (values in [1, D]); ties resolve by local rank."""
    B, D = 2, 30
    local = torch.randn(B, D, generator=rng)
    grank = torch.randint(1, 4, (D,), generator=rng)
    for lam in (0.5, 1.0):
        _check_select(local, grank, lam, 8)


# ---------------------------------------------------------------------------------------------
# dispatch, fast path, opcheck
# ---------------------------------------------------------------------------------------------

def test_prevalidated_matches_public(rng):
    D, d = 40, 24
    wg, wu, wd = _weights(rng, D, d, torch.bfloat16)
    idx64 = _idx(rng, 2, D, 15, True, torch.int64)
    idx32 = ops.validate_sparse_ffn_operands(wg, wu, wd, idx64, "silu")
    assert idx32.dtype == torch.int32 and idx32.is_contiguous() and torch.equal(idx32.long(), idx64)
    x = torch.randn(2, 3, d, generator=rng).to(torch.bfloat16)
    torch.testing.assert_close(ops.sparse_ffn_prevalidated(x, wg, wu, wd, idx32, "silu"),
                               ops.sparse_ffn(x, wg, wu, wd, idx64), rtol=0, atol=0)
    w_in, w_out = _weights(rng, D, d, torch.bfloat16, 2)
    b_in, b_out = torch.randn(D).to(torch.bfloat16), torch.randn(d).to(torch.bfloat16)
    i32 = ops.validate_sparse_mlp_operands(w_in, b_in, w_out, b_out, idx64[0], "gelu")
    torch.testing.assert_close(ops.sparse_mlp_prevalidated(x, w_in, b_in, w_out, b_out, i32, "gelu"),
                               ops.sparse_mlp(x, w_in, b_in, w_out, b_out, idx64[0], "gelu"), rtol=0, atol=0)
    with glass_kernels.backend("torch"):  # goes through the registered op, same semantics
        ref = ops.sparse_ffn_prevalidated(x, wg, wu, wd, idx32, "silu")
    assert_close_derived(ref, native_ffn(x, wg, wu, wd, None, None, idx32, "silu", torch.float64),
                         native_ffn(x, wg, wu, wd, None, None, idx32, "silu", torch.bfloat16))


def test_prevalidated_still_checks_x(rng):
    wg, wu, wd = _weights(rng, 10, 8, torch.float32)
    idx = ops.validate_sparse_ffn_operands(wg, wu, wd, torch.arange(4), "silu")
    with pytest.raises(ValueError, match="x"):
        ops.sparse_ffn_prevalidated(torch.randn(1, 2, 9), wg, wu, wd, idx, "silu")
    with pytest.raises(TypeError, match="x"):
        ops.sparse_ffn_prevalidated(torch.randn(1, 2, 8).half(), wg, wu, wd, idx, "silu")


def test_backend_resolution(monkeypatch):
    from glass_kernels import backend as bk
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bk.get() == "auto"
    with glass_kernels.backend("torch"):
        assert bk.resolve(cpu) == "torch"
        with glass_kernels.backend("auto"):  # nests
            assert bk.resolve(cpu) == ("cpp" if _ext.available() else "torch")
        assert bk.get() == "torch"
    assert bk.get() == "auto"
    token = glass_kernels.backend.set("torch")
    assert bk.get() == "torch"
    glass_kernels.backend.reset(token)
    with glass_kernels.backend("cpp"), pytest.raises(RuntimeError, match="CPU"):
        bk.resolve(cuda)
    monkeypatch.setattr(bk, "_triton_tried", True)
    monkeypatch.setattr(bk, "_triton_mod", None)
    assert bk.resolve(cuda, "auto") == "torch"  # no triton -> reference on CUDA
    with pytest.raises(RuntimeError, match="triton"):
        bk.resolve(cpu, "triton")
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_load_error", "ImportError: simulated")
    assert bk.resolve(cpu, "auto") == "torch"
    with pytest.raises(RuntimeError, match="cpp"):
        bk.resolve(cpu, "cpp")


def test_threads_follow_torch():
    if not _ext.available():
        pytest.skip(f"C++ extension not available ({_ext.load_error()})")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ops.select_neurons(torch.randn(5), torch.arange(1, 6), 0.5, 2)
        assert _ext.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    ops.select_neurons(torch.randn(5), torch.arange(1, 6), 0.5, 2)
    assert _ext.get_num_threads() == before


def test_isa_context_restores():
    if not _ext.available():
        pytest.skip(f"C++ extension not available ({_ext.load_error()})")
    before = _ext.get_isa()
    with _ext.isa("scalar"):
        assert _ext.get_isa() == "scalar"
    assert _ext.get_isa() == before
    with pytest.raises(ValueError, match="isa"):
        _ext.set_isa("sse9")


def _opcheck_samples(rng):
    D, d = 23, 11
    wg, wu, wd = _weights(rng, D, d, torch.float32)
    x = torch.randn(2, 3, d, generator=rng)
    idx = _idx(rng, 2, D, 7, True)
    h = torch.randn(2, 3, D, generator=rng)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.uint8)
    dn = torch.rand(D, generator=rng)
    local = torch.randn(2, D, generator=rng)
    grank = (torch.randperm(D, generator=rng) + 1).to(torch.int32)
    return {
        "sparse_ffn": (torch.ops.glass.sparse_ffn.default, (x, wg, wu, wd, idx, "silu")),
        "sparse_mlp": (torch.ops.glass.sparse_mlp.default, (x, wg, torch.randn(D, generator=rng), wd, None, idx, "gelu")),
        "neuron_stats": (torch.ops.glass.neuron_stats.default, (h, dn, mask)),
        "neuron_stats_": (torch.ops.glass.neuron_stats_.default, (h, None, mask, torch.zeros(2, D))),
        "select_neurons": (torch.ops.glass.select_neurons.default, (local, grank, 0.3, 5)),
    }


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", ["sparse_ffn", "sparse_mlp", "neuron_stats", "neuron_stats_", "select_neurons"])
def test_opcheck(name, backend, rng):
    op, args = _opcheck_samples(rng)[name]
    with glass_kernels.backend(backend):
        torch.library.opcheck(op, args)


def test_import_without_extension_transformers_or_triton():
    """`import glass_kernels` needs only torch; without _C the ops fall back to the reference."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["glass_kernels._C"] = None  # makes `import glass_kernels._C` raise ImportError
import torch, glass_kernels
from glass_kernels import _ext, ops
assert "transformers" not in sys.modules and "triton" not in sys.modules, "heavy imports at import time"
assert not _ext.available() and _ext.supported_isas() == []
y = ops.sparse_ffn(torch.ones(1, 4), torch.ones(6, 4), torch.ones(6, 4), torch.ones(6, 4), torch.tensor([1, 2]))
assert y.shape == (1, 4)
try:
    with glass_kernels.backend("cpp"):
        ops.select_neurons(torch.randn(6), torch.arange(1, 7), 0.5, 2)
except RuntimeError as e:
    assert "cpp" in str(e)
else:
    raise AssertionError("backend cpp without the extension must raise")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_isa_fixture_runs_that_kernel(isa, dtype, rng):
    """The shared `isa` fixture really switches the core: the kernel name says the ISA, and the
    dispatched op on that path matches the oracle."""
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    assert _ext.get_isa() == isa
    assert _ext.load().kernel_name(name, True).split("__")[-1] in backends.kernel_isas(isa, name)
    D, d = 70, 45
    wg, wu, wd = _weights(rng, D, d, dtype)
    x = torch.randn(2, 3, d, generator=rng).to(dtype)
    idx = _idx(rng, 2, D, 31, True)
    with glass_kernels.backend("cpp"):
        y = ops.sparse_ffn(x, wg, wu, wd, idx)
    assert_close_derived(y, native_ffn(x, wg, wu, wd, None, None, idx, "silu", torch.float64),
                         native_ffn(x, wg, wu, wd, None, None, idx, "silu", dtype), f"sparse_ffn[{isa}]")


def test_cpp_result_independent_of_thread_count(rng):
    """The core promises bitwise-identical sums for any thread count (chunk buffers summed in
    order); the ops hand it torch's thread count, so changing torch's must not change y."""
    if not _ext.available():
        pytest.skip(f"C++ extension not available ({_ext.load_error()})")
    D, d = 300, 40  # k = 250 -> several 48-neuron chunks
    wg, wu, wd = _weights(rng, D, d, torch.bfloat16)
    x = torch.randn(2, 5, d, generator=rng).to(torch.bfloat16)
    idx = _idx(rng, 2, D, 250, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = ops.sparse_ffn(x, wg, wu, wd, idx)
        torch.set_num_threads(2)
        y2 = ops.sparse_ffn(x, wg, wu, wd, idx)
        assert _ext.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)
