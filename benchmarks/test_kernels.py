"""Kernel benchmarks: one FFN layer's decode step (T = 1, B = 1), cold cache, three ways side by side.

    dense    torch, as HF's LlamaMLP: down(act(gate(x)) * up(x)) with F.linear (contiguous weights)
    compact  torch on a compacted copy: the selected rows of W_gate / W_up and columns of W_down
             gathered once (not timed), then the same dense F.linear calls on the copy
    sparse1  glass_kernels._C.sparse_ffn on the full neuron-major weights (no copy), one selected
             neuron at a time (the kernel before neuron groups)
    sparse   the same op with the ISA path, neurons in flight and prefetch distance that
             glass_kernels.tuning measures as best for this machine, on these same cold layers
    bundled  the same op on the neuron-bundled layout (glass_kernels.ffn.layout: neuron i's gate,
             up and down rows adjacent in one [D, 3, d] block, row stride 3d), with the setting
             measured on that layout
    q8_0 / q4_0  glass_kernels.quant.sparse_ffn_q's kernel on quantized, neuron-bundled rows (int8 /
             4-bit blocks with fp16 scales; fp32 activations, so only in the float32 rows), cycling
             through >= 1 GiB of quantized layers, with the setting (ISA path, neurons in flight,
             prefetch) glass_kernels.tuning measures on those rows, as patch(weights=...) does; GB/s
             counts the quantized bytes read, x dense compares with torch dense fp32

Every weight tensor here, the torch baselines' included, sits in memory advised as transparent huge
pages (glass_kernels.ffn.layout.empty_huge_pages, as `patch` allocates the rows its kernel reads):
the baselines get the same memory as the kernel, so that they stay the strongest of their kind.

Each call uses the next of L distinct layers, L * layer bytes >= 1 GiB, and a sparse case cycles
through ceil(1 / keep) index sets that together cover every neuron (after all layers with one set, all
layers with the next): the bytes read between two reads of the same row are >= 1 GiB at any keep, so
the L3 (hundreds of MiB) cannot hold them and every call streams its weights from DRAM as a real
decode step does. The same
run measures a STREAM-like read bandwidth (a sum over 1 GiB), and times select_neurons and
neuron_stats at D = 14336, T = 32 against the dense FFN prefill of those 32 tokens.

    pytest benchmarks/test_kernels.py --benchmark-json=kernels.json     # full matrix (< 10 min)
    GLASS_BENCH_QUICK=1 pytest benchmarks/test_kernels.py                # subset (about 1 min)
    python benchmarks/kernel_table.py kernels.json                        # README table

Memory bandwidth on a shared machine moves by tens of percent within minutes, so each decode case
also measures the STREAM-like read just before and just after itself (extra_info stream_gbps: their
mean, with both values kept), and kernel_table.py reports "% of STREAM" against that local figure:
a case and its bound, seconds apart instead of minutes. The STREAM buffer sits in huge-page-advised
memory like the weights (_stream_gib).

Nothing here asserts a timing. extra_info of every case: GB/s (bytes the case must read / median
time), ratios to dense and to compact of the same run, the local STREAM figure, machine, ISA, kernel,
threads, load.
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from conftest import covering_sets, machine_info, median_s, quick_mode, set_threads

_C = pytest.importorskip("glass_kernels._C", reason="the C++ extension is not built (pip install -e .)")
from glass_kernels import _ext, tuning  # noqa: E402
from glass_kernels import quant  # noqa: E402
from glass_kernels.ffn.layout import bundled_views, empty_huge_pages, huge_pages_copies, huge_pages_copy  # noqa: E402

_ext.load()  # the library's threading choice (torch's OpenMP team where shared), as in a patched model
DEFAULT_TUNING = _C.get_decode_tuning()

GIB = 1 << 30
SHAPES = [(576, 1536), (2048, 8192), (4096, 14336)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KEEPS = [1.0, 0.5, 0.3, 0.2]
THREADS = [1, 2]


def _cases():
    shapes, dtypes, keeps, threads = SHAPES, list(DTYPES), KEEPS, THREADS
    if quick_mode():
        shapes, keeps, threads = [(2048, 8192)], [1.0, 0.3], [2]
    out = []
    # Grouped by (shape, dtype) so one set of layers lives at a time; dense first, then per keep
    # compact before sparse, so every case finds its baselines in `results`.
    for shape in shapes:
        for dt in dtypes:
            for nt in threads:
                out.append((shape, dt, nt, 1.0, "dense"))
                for keep in keeps:
                    if keep < 1.0:
                        out.append((shape, dt, nt, keep, "compact"))
                    out.append((shape, dt, nt, keep, "sparse1"))  # one neuron at a time
                    out.append((shape, dt, nt, keep, "sparse"))  # the setting measured for this machine
                    out.append((shape, dt, nt, keep, "bundled"))  # ... on the neuron-bundled layout
                    if dt == "float32":
                        out += [(shape, dt, nt, keep, "q8_0"), (shape, dt, nt, keep, "q4_0")]
    return out


def _case_id(c):
    (d, D), dt, nt, keep, impl = c
    return f"{d}x{D}-{dt}-t{nt}-keep{keep}-{impl}"


class Layers:
    """L distinct FFN layers of one shape and dtype, >= 1 GiB in all. Each layer keeps W_down in
    HF's layout [d, D] for the torch baselines and neuron-major [D, d] for sparse_ffn."""

    def __init__(self, d: int, D: int, dtype: torch.dtype):
        self.d, self.D, self.dtype = d, D, dtype
        self.layer_bytes = 3 * d * D * torch.finfo(dtype).bits // 8
        self.L = max(2, -(-GIB // self.layer_bytes))
        g = torch.Generator().manual_seed(0)
        self.layers = []
        for _ in range(self.L):
            wg = (torch.randn(D, d, generator=g) / d**0.5).to(dtype)
            wu = (torch.randn(D, d, generator=g) / d**0.5).to(dtype)
            wd = (torch.randn(d, D, generator=g) / D**0.5).to(dtype)
            # one allocation per layer, as patch places a layer's operands: small ones (576x1536)
            # then fill whole huge pages too
            self.layers.append(tuple(huge_pages_copies([wg, wu, wd, wd.t()])))
        self.x = torch.randn(1, 1, d, generator=g).to(dtype)
        self.i = 0
        self._bundled = None
        self._quantized: dict = {}

    def next(self):
        self.i = (self.i + 1) % self.L
        return self.layers[self.i]

    def quantized(self, wtype: str) -> list:
        """Layers of quantized, neuron-bundled rows ([D, 3, row_bytes] each, viewed as three operands),
        as many as make >= 1 GiB of quantized bytes (they repeat the float layers' values)."""
        if self._quantized.get(wtype) is None:
            self._quantized.clear()
            gc.collect()
            one = [huge_pages_copy(torch.stack([quant.quantize(w, wtype) for w in (wg, wu, wdt)], dim=1))
                   for wg, wu, _, wdt in self.layers]
            n = max(2, -(-GIB // one[0].numel()))
            blocks = [one[i] if i < len(one) else huge_pages_copy(one[i % len(one)]) for i in range(n)]
            self._quantized[wtype] = [tuple(b[:, j] for j in range(3)) for b in blocks]
        return self._quantized[wtype]

    def bundled(self) -> list:
        """Per layer (w_gate, w_up, w_down_t) as views of one [D, 3, d] block (made on first use)."""
        if self._bundled is None:
            self._bundled = [bundled_views([wg, wu, wdt]) for wg, wu, _, wdt in self.layers]
        return self._bundled


_layers_cache: dict = {}


def _get_layers(d, D, dtype) -> Layers:
    key = (d, D, dtype)
    if key not in _layers_cache:
        _layers_cache.clear()  # one set at a time (up to ~2 GiB)
        gc.collect()
        _layers_cache[key] = Layers(d, D, dtype)
    return _layers_cache[key]


class _Cycle:
    """The (layer, index set) of each call: all layers with one set, then all layers with the next."""

    def __init__(self, layers: int, sets: int):
        self.layers, self.sets, self.i = layers, sets, 0

    def next(self) -> tuple[int, int]:
        self.i = (self.i + 1) % (self.layers * self.sets)
        return self.i % self.layers, self.i // self.layers


_stream_buffer: torch.Tensor | None = None


def _stream_gib() -> torch.Tensor:
    """1 GiB of fp32 ones for the STREAM-like reads (allocated once, kept for the session), in
    huge-page-advised memory like the weights: the bound must read pages of the same size (on the
    Xeon VM, 2026-12-06 evening, torch.sum read 19.5 GB/s from 4 KiB pages and 28.1 from huge pages)."""
    global _stream_buffer
    if _stream_buffer is None:
        _stream_buffer = empty_huge_pages((GIB // 4,), torch.float32, "cpu").fill_(1.0)
    return _stream_buffer


def _stream_read(how: str, nt: int):
    """One STREAM-like read of 1 GiB: torch.sum ("sum") or the extension's plain read probe ("read")."""
    a = _stream_gib()
    return a.sum() if how == "sum" else _C.read_bandwidth_probe(a.data_ptr(), GIB, nt)


def local_stream_gbps(nt: int, reps: int = 2) -> float:
    """The STREAM-like read now (GB/s): the faster of torch.sum and the read probe, each the mean of
    ``reps`` reads of 1 GiB (as test_stream_bandwidth takes the faster of the two). About 0.3 s."""
    import time

    best = 0.0
    for how in ("sum", "read"):
        t0 = time.perf_counter()
        for _ in range(reps):
            _stream_read(how, nt)
        best = max(best, reps * GIB / (time.perf_counter() - t0) / 1e9)
    return best


def _rounds(seconds_per_call: float) -> int:
    # ~1 s of measurement per case, 5..60 calls (each call is a different layer).
    return int(min(60, max(5, 1.0 / max(seconds_per_call, 1e-6))))


def sparse_ffn_c(x, wg, wu, wdt, idx, y, activation="silu"):
    """_C.sparse_ffn on rows one stride apart (the bench stays independent of the Python ops layer)."""
    B, T, d = x.shape
    _C.sparse_ffn(str(x.dtype).replace("torch.", ""), activation, x.data_ptr(), B, T, d,
                  wg.data_ptr(), wu.data_ptr(), wdt.data_ptr(), wg.shape[0], idx.data_ptr(),
                  idx.numel(), False, y.data_ptr(), wg.stride(0))
    return y


def sparse_ffn_q_c(x, wg, wu, wdt, idx, y, wtype):
    """_C.sparse_ffn_q on quantized rows one stride apart (fp32 activations)."""
    B, T, d = x.shape
    ldw = wg.stride(0) // quant.block_bytes(wtype) * quant.BLOCK
    _C.sparse_ffn_q(wtype, "float32", "silu", x.data_ptr(), B, T, d, wg.data_ptr(), wu.data_ptr(), wdt.data_ptr(),
                    ldw, wg.shape[0], idx.data_ptr(), idx.numel(), False, y.data_ptr())
    return y


def _quantized_bytes(lay, wtype, idx) -> int:
    """Bytes of quantized rows one call reads (3 rows per selected neuron)."""
    return 3 * idx.numel() * quant.row_bytes(wtype, lay.d)


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_decode_ffn(benchmark, results, case):
    (d, D), dt_name, nt, keep, impl = case
    dtype = DTYPES[dt_name]
    set_threads(nt)
    lay = _get_layers(d, D, dtype)
    x = lay.x
    sets = covering_sets(D, keep)
    idx = sets[0]
    k = idx.numel()
    nbytes = lay.layer_bytes * (1.0 if impl == "dense" else k / D)

    if impl in quant.QTYPES:
        nbytes = _quantized_bytes(lay, impl, idx)
    if impl == "dense":
        def step():
            wg, wu, wd, _ = lay.next()
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    elif impl == "compact":  # one copy per (layer, set): about the layers' bytes again
        copies = [[(huge_pages_copy(wg[il]), huge_pages_copy(wu[il]), huge_pages_copy(wd[:, il]))
                   for il in (ix.long() for ix in sets)] for wg, wu, wd, _ in lay.layers]
        cycle = _Cycle(len(copies), len(sets))

        def step():
            li, si = cycle.next()
            cg, cu, cd = copies[li][si]
            return F.linear(F.silu(F.linear(x, cg)) * F.linear(x, cu), cd)
    elif impl in quant.QTYPES:
        operands = lay.quantized(impl)
        y = torch.empty_like(x)
        qkey = (d, D, nt, keep, impl)
        if qkey not in results:  # the per-machine choice, measured on these rows as patch(weights=...) does
            results[qkey] = tuning.choose_quantized(tuning.measure_quantized(operands, impl, d, keep=keep))
        _C.set_isa(results[qkey][0])
        _C.set_decode_tuning(results[qkey][1], results[qkey][2])
        cycle = _Cycle(len(operands), len(sets))

        def step():
            li, si = cycle.next()
            return sparse_ffn_q_c(x, *operands[li], sets[si], y, impl)
    else:
        y = torch.empty_like(x)
        operands = lay.bundled() if impl == "bundled" else [(wg, wu, wdt) for wg, wu, _, wdt in lay.layers]
        if impl == "sparse1":
            setting = ("auto", 1, 0)
        else:  # the per-machine choice, measured on these same layers (cold) by glass_kernels.tuning
            tkey = (d, D, dt_name, nt, keep, impl)
            if tkey not in results:
                results[tkey] = tuning.choose(tuning.measure(operands, dtype, d, keep=keep))
            setting = results[tkey]
        _C.set_isa(setting[0])
        _C.set_decode_tuning(setting[1], setting[2])
        cycle = _Cycle(len(operands), len(sets))

        def step():
            li, si = cycle.next()
            return sparse_ffn_c(x, *operands[li], sets[si], y)

    n_warm = lay.L if impl == "dense" else len(copies) if impl == "compact" else len(operands)
    for _ in range(n_warm):  # warm-up: every layer once (page faults, thread pools)
        step()
    est = nbytes / 10e9
    stream_before = local_stream_gbps(nt)
    benchmark.pedantic(step, rounds=_rounds(est), iterations=1, warmup_rounds=0)
    stream_after = local_stream_gbps(nt)
    t = median_s(benchmark)
    key = (d, D, dt_name, nt)
    results[key + (keep, impl)] = t
    info = benchmark.extra_info
    info.update(machine_info())
    info.update(d=d, D=D, dtype=dt_name, threads=nt, keep=keep, k=k, impl=impl, layers=lay.L,
                bytes_per_call=int(nbytes), gbps=round(nbytes / t / 1e9, 2),
                stream_before_gbps=round(stream_before, 2), stream_after_gbps=round(stream_after, 2),
                stream_gbps=round((stream_before + stream_after) / 2, 2))
    if impl in quant.QTYPES:
        info["kernel"] = _C.qkernel_name(impl)
        info["neurons_in_flight"], info["prefetch_neurons"] = _C.get_decode_tuning()
        info["layers"] = len(lay.quantized(impl))
        _C.set_isa("auto")
        _C.set_decode_tuning(*DEFAULT_TUNING)
    elif impl.startswith("sparse") or impl == "bundled":
        info["kernel"] = _C.kernel_name(dt_name, True)
        info["neurons_in_flight"], info["prefetch_neurons"] = _C.get_decode_tuning()
        _C.set_isa("auto")
        _C.set_decode_tuning(*DEFAULT_TUNING)
    dense = results.get(key + (1.0, "dense"))
    if dense:
        info["speedup_vs_dense"] = round(dense / t, 3)
    compact = results.get(key + (keep, "compact"))
    if compact and (impl.startswith("sparse") or impl in ("bundled", *quant.QTYPES)):
        info["speedup_vs_compact"] = round(compact / t, 3)
    if impl == "compact":
        del copies
        gc.collect()


@pytest.mark.parametrize("how", ["sum", "read"])
@pytest.mark.parametrize("nt", [1, 2] if not quick_mode() else [2])
def test_stream_bandwidth(benchmark, nt, how):
    """STREAM-like read bandwidth over 1 GiB (reads only, like a decode step), two ways: torch.sum of
    fp32 ("stream_sum"), and the extension's plain read probe, nt threads XOR-folding 64-bit words
    ("stream_read": no float dependency chain; on some VMs torch.sum reads slower than the gathered
    kernels). kernel_table.py takes the faster of the two as the run's STREAM figure."""
    set_threads(nt)

    def step():
        return _stream_read(how, nt)

    step()
    benchmark.pedantic(step, rounds=8, iterations=1, warmup_rounds=1)
    t = median_s(benchmark)
    benchmark.extra_info.update(machine_info())
    benchmark.extra_info.update(impl=f"stream_{how}", threads=nt, bytes_per_call=GIB,
                                gbps=round(GIB / t / 1e9, 2))


SEL_D, SEL_DM, SEL_T = 14336, 4096, 32


@pytest.fixture(scope="module")
def prompt_ffn():
    """The prompt's FFN intermediate h [1, 32, 14336] and a dense prefill to compare against."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(1, SEL_T, SEL_D, generator=g)
    local = torch.zeros(1, SEL_D)
    _C.neuron_stats("float32", h.data_ptr(), 1, SEL_T, SEL_D, 0, 0, local.data_ptr())
    rank = (torch.randperm(SEL_D, generator=g) + 1).to(torch.int32)
    return h, local, rank


@pytest.mark.parametrize("what", ["dense_prefill_ffn", "neuron_stats_f32", "neuron_stats_bf16",
                                  "neuron_stats_impact", "select_neurons", "stats_plus_select"])
def test_selection_cost(benchmark, results, prompt_ffn, what):
    """select_neurons + neuron_stats for a 32-token prompt at D = 14336 (2 threads), and the dense
    FFN prefill of the same prompt at (4096, 14336) fp32: the issue wants the first < 2% of it."""
    set_threads(2)
    h, local, rank = prompt_ffn
    k = int(0.3 * SEL_D)
    out = torch.zeros(1, SEL_D)
    idx = torch.empty(1, k, dtype=torch.int32)
    hb = h.to(torch.bfloat16)
    dn = torch.rand(SEL_D) + 0.5
    if what == "neuron_stats_f32":
        fn = lambda: _C.neuron_stats("float32", h.data_ptr(), 1, SEL_T, SEL_D, 0, 0, out.data_ptr())
    elif what == "neuron_stats_bf16":
        fn = lambda: _C.neuron_stats("bfloat16", hb.data_ptr(), 1, SEL_T, SEL_D, 0, 0, out.data_ptr())
    elif what == "neuron_stats_impact":
        fn = lambda: _C.neuron_stats("float32", h.data_ptr(), 1, SEL_T, SEL_D, dn.data_ptr(), 0,
                                     out.data_ptr())
    elif what == "select_neurons":
        fn = lambda: _C.select_neurons(local.data_ptr(), 1, SEL_D, rank.data_ptr(), 0.5, k,
                                       idx.data_ptr())
    elif what == "stats_plus_select":
        # No out.zero_() between calls: a torch op (and its thread wake-ups) is not part of the
        # cost; the sums just keep growing, which changes neither kernel's work.
        def fn():
            _C.neuron_stats("float32", h.data_ptr(), 1, SEL_T, SEL_D, 0, 0, out.data_ptr())
            _C.select_neurons(out.data_ptr(), 1, SEL_D, rank.data_ptr(), 0.5, k, idx.data_ptr())
    else:
        g = torch.Generator().manual_seed(3)
        wg = torch.randn(SEL_D, SEL_DM, generator=g)
        wu = torch.randn(SEL_D, SEL_DM, generator=g)
        wd = torch.randn(SEL_DM, SEL_D, generator=g)
        x = torch.randn(1, SEL_T, SEL_DM, generator=g)
        fn = lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    fn()
    benchmark.pedantic(fn, rounds=20 if what == "dense_prefill_ffn" else 200, iterations=1,
                       warmup_rounds=2)
    t = median_s(benchmark)
    results[("sel", what)] = t
    benchmark.extra_info.update(machine_info())
    benchmark.extra_info.update(impl=what, D=SEL_D, T=SEL_T, threads=2)
    dense = results.get(("sel", "dense_prefill_ffn"))
    if what != "dense_prefill_ffn" and dense:
        benchmark.extra_info["pct_of_dense_prefill"] = round(100 * t / dense, 3)
