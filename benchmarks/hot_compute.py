"""The decode kernel's arithmetic ceiling: GB/s of rows that stay in cache (L2-sized layers, every
neuron selected, called back to back), next to the cold figures of the kernel benchmark.

Where the cold figure is near this one, the kernel is bound by its arithmetic, not by memory: no
prefetch or in-flight setting can lift it, only fewer instructions per value.

    python benchmarks/hot_compute.py                              # q8_0, q4_0, float32, bfloat16; 1 and 2 threads
    python benchmarks/hot_compute.py --formats q8_0 --threads 1 --in-flight 4 --isa avx2
    python benchmarks/hot_compute.py --formats bfloat16 --isa avx512 avx512_ext   # two paths, alternating

Prints one line per case (and ISA path): the median GB/s of the rows read (quantized bytes for q8_0 /
q4_0), its range over the rounds, and ns per 32-value block (quantized rows). With several paths,
each round times them in turn on the same rows (this VM-class machine drifts by more than the
differences between paths within minutes), and a last line gives the median and range of the
per-round ratios of each path to the first. Nothing here is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ab_builds import caller, row_bytes  # the A/B script's kernel call and row size
from glass_kernels import _C, quant

FORMATS = ("q8_0", "q4_0", "float32", "bfloat16")


def layer(fmt: str, d: int, D: int) -> tuple[torch.Tensor, ...]:
    """One layer of neuron-bundled rows [D, 3, row] viewed as (gate, up, down^T), in torch's own
    allocation: ab_builds.bundled_layers' huge-page-advised blocks read 10-15% slower here on the Zen 4
    (2026-12-07, not investigated further), and this script measures the arithmetic, not the pages."""
    ws = [torch.randn(D, d) * 0.02 for _ in range(3)]
    ws = [quant.quantize(w, fmt) for w in ws] if fmt in quant.QTYPES else [w.to(getattr(torch, fmt)) for w in ws]
    block = torch.stack(ws, dim=1)
    return tuple(block[:, j] for j in range(3))


def measure(fmt: str, d: int, cache_bytes: int, threads: int, rounds: int, seconds: float,
            isas: list[str]) -> dict:
    """GB/s per round for each of ``isas`` (the paths alternate within each round)."""
    D = max(threads, cache_bytes * threads // (3 * row_bytes(fmt, d)))  # each thread's share fits its cache
    ops = layer(fmt, d, D)
    x = torch.randn(1, 1, d).to(torch.float32 if fmt in quant.QTYPES else getattr(torch, fmt))
    y = torch.empty_like(x)
    idx = torch.arange(D, dtype=torch.int32)
    run = caller(_C, fmt, x, y)

    def call():
        run(ops, idx)

    nbytes = 3 * D * row_bytes(fmt, d)
    got = {isa: [] for isa in isas}
    for isa in isas:  # warm up every path (code, rows in cache)
        _C.set_isa(isa)
        for _ in range(20):
            call()
    slot = seconds / rounds / len(isas)
    for _ in range(rounds):
        for isa in isas:
            _C.set_isa(isa)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < slot:
                for _ in range(50):
                    call()
                n += 50
            got[isa].append(n * nbytes / (time.perf_counter() - t0) / 1e9)
    return {"D": D, "gbps": got, "bytes": nbytes}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--d", type=int, default=2048, help="row length (model width)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--cache-kib", type=int, default=512, help="bytes of rows per thread (fit them in L2)")
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--isa", nargs="+", help="ISA path(s) to time (set_isa; default: the automatic choice); "
                   "several alternate within each round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per case")
    a = p.parse_args(argv)
    isas = a.isa or [_C.get_isa()]
    _C.set_decode_tuning(a.in_flight, 0)  # rows already in cache: nothing to prefetch
    print(f"ISA {', '.join(isas)}, {a.in_flight} in flight, d = {a.d}, {a.cache_kib} KiB of rows per thread, "
          f"torch {torch.__version__}")
    for threads in a.threads:
        torch.set_num_threads(threads)
        _C.set_num_threads(threads)
        for fmt in a.formats:
            r = measure(fmt, a.d, a.cache_kib * 1024, threads, a.rounds, a.seconds, isas)
            for isa, got in r["gbps"].items():
                med = statistics.median(got)
                per_block = ""
                if fmt in quant.QTYPES:
                    per_block = f", {quant.block_bytes(fmt) / med * threads:.2f} ns per block per thread"
                print(f"{fmt:9s} {threads} thread(s), {isa}, D = {r['D']}: {med:.1f} GB/s "
                      f"({min(got):.1f}-{max(got):.1f}){per_block}", flush=True)
            first = r["gbps"][isas[0]]
            for isa in isas[1:]:
                ratios = [v / f for v, f in zip(r["gbps"][isa], first)]
                print(f"{'':9s} {isa} / {isas[0]}, per round: {statistics.median(ratios):.2f}x "
                      f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)


if __name__ == "__main__":
    main()
