"""A/B in one process: the same reads from plain memory (4 KiB pages where THP is in "madvise" mode)
and from memory advised as huge pages (glass_kernels.ffn.layout.empty_huge_pages, what patch gives
the rows its kernel reads), alternating every round, cold (>= 1 GiB cycled per pass).

Rows of the report:
  read  sum / probe    1 GiB of fp32 read by torch.sum and by the extension's read probe
  torch dense fp32     torch's dense SwiGLU FFN (three F.linear), the baseline of every speed-up
  fp32 separate        the gathered decode kernel over separate [D, d] operands (a layer's operands in
                       one advised allocation, as patch places them, or each in plain memory)
  q8_0 bundled         the same over neuron-bundled Q8_0 rows ([D, 3, row_bytes] blocks)

Each row: median GB/s of each side over ``--rounds`` pairs (first pair dropped), their range, and
the median of the per-pair ratios (huge / plain). The page size each side got is printed from
/proc/self/smaps_rollup (AnonHugePages) and the THP mode from sysfs: with THP "always" both sides get
huge pages and the A/B measures nothing; with THP "never" (or off Linux) neither does.

    python benchmarks/ab_huge_pages.py [--threads 2] [--rounds 8] [--shape 2048x8192] [--keep 0.5]
        [--json FILE]

Nothing here is asserted: it is the command behind the README's page-size figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from glass_kernels import _C, quant
from glass_kernels.ffn.layout import huge_pages_copies, huge_pages_copy

GIB = 1 << 30


def thp_mode() -> str:
    """The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled ("" where there is none)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()


def huge_share(tensors) -> float:
    """The share of the tensors' bytes that lie in mappings backed by huge pages, from
    /proc/self/smaps (each mapping's AnonHugePages, spread evenly over it); 0 where it cannot be read."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0.0
    maps, lo, hi = [], 0, 0
    for line in text.splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
        elif head == "AnonHugePages:" and hi > lo:
            maps.append((lo, hi, int(line.split()[1]) * 1024 / (hi - lo)))
    total = covered = 0.0
    for t in tensors:
        a = t.data_ptr()  # the bytes the tensor's elements span
        b = a + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()
        total += b - a
        covered += sum(share * max(0, min(b, m_hi) - max(a, m_lo)) for m_lo, m_hi, share in maps)
    return covered / total if total else 0.0


def placed(t: torch.Tensor, huge: bool) -> torch.Tensor:
    """A contiguous copy of ``t``: advised as huge pages, or plain (torch.empty)."""
    return huge_pages_copy(t) if huge else t.clone(memory_format=torch.contiguous_format)


def placed_layer(ts: list[torch.Tensor], huge: bool) -> tuple:
    """Copies of one layer's tensors: in one huge-page-advised allocation, as patch places a layer
    (ffn.layout.huge_pages_copies), or each in plain memory."""
    return tuple(huge_pages_copies(ts)) if huge else tuple(placed(t, False) for t in ts)


def float_layers(d: int, D: int, huge: bool) -> list[tuple]:
    """Per layer the separate fp32 operands (w_gate, w_up, w_down_t) [D, d] and w_down [d, D] for
    torch's dense path, >= 1 GiB of each."""
    g = torch.Generator().manual_seed(0)
    n = max(2, -(-GIB // (3 * d * D * 4)))
    out = []
    for _ in range(n):
        wg, wu, wdt = (torch.randn(D, d, generator=g) / d**0.5 for _ in range(3))
        out.append(placed_layer([wg, wu, wdt, wdt.t()], huge))
    return out


def dense_ffn(x: torch.Tensor, wg, wu, wd) -> torch.Tensor:
    """torch's dense SwiGLU FFN of one token (the baseline the patch is compared with)."""
    F = torch.nn.functional
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def q8_layers(d: int, D: int, huge: bool) -> list[tuple]:
    """Neuron-bundled Q8_0 rows, >= 1 GiB in all, as three [D, row_bytes] views per block."""
    g = torch.Generator().manual_seed(0)
    row = quant.row_bytes("q8_0", d)
    out = []
    for _ in range(max(2, -(-GIB // (3 * D * row)))):
        block = torch.stack([quant.quantize(torch.randn(D, d, generator=g) / d**0.5, "q8_0") for _ in range(3)], dim=1)
        block = placed(block, huge)
        out.append(tuple(block[:, j] for j in range(3)))
    return out


def pass_gbps(call, layers, sets, nbytes: int) -> float:
    """GB/s of one pass over every (layer, index set) pair, ``nbytes`` read per call."""
    t0 = time.perf_counter()
    n = 0
    for s in sets:
        for ops in layers:
            call(ops, s)
            n += 1
    return n * nbytes / (time.perf_counter() - t0) / 1e9


def ab(name: str, plain, huge, rounds: int) -> dict:
    """Alternate plain() and huge() (each returns GB/s), the order swapped every round."""
    got = {"plain": [], "huge": []}
    plain(), huge()  # page faults, code, thread wake-up
    for r in range(rounds):
        for side in (("plain", "huge") if r % 2 == 0 else ("huge", "plain")):
            got[side].append(plain() if side == "plain" else huge())
    ratios = [h / p for p, h in zip(got["plain"], got["huge"])]
    row = {"case": name, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    for side, v in got.items():
        row[side] = {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
    return row


def read_rows(threads: int, rounds: int) -> list[dict]:
    bufs = {side: placed(torch.ones(GIB // 4), side == "huge") for side in ("plain", "huge")}

    def gbps(how: str, side: str) -> float:
        a = bufs[side]
        t0 = time.perf_counter()
        a.sum() if how == "sum" else _C.read_bandwidth_probe(a.data_ptr(), GIB, threads)
        return GIB / (time.perf_counter() - t0) / 1e9

    rows = [ab(f"read {how}, 1 GiB", lambda h=how: gbps(h, "plain"), lambda h=how: gbps(h, "huge"), rounds)
            for how in ("sum", "probe")]
    del bufs
    gc.collect()
    return rows


def _bench_module(name: str):
    """A module of benchmarks/ (the kernel benchmark's helpers, its conftest), imported on use."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return __import__(name)


def kernel_rows(d: int, D: int, keep: float, rounds: int) -> list[dict]:
    tk = _bench_module("test_kernels")
    sets = _bench_module("conftest").covering_sets(D, keep)
    k = sets[0].numel()
    x = torch.randn(1, 1, d)
    y = torch.empty_like(x)
    rows = []
    dense_sets = sets[:1]  # the dense FFN reads every row whatever the set
    for kind, make, call, nbytes, kind_sets in (
            ("torch dense fp32", float_layers, lambda o, s: dense_ffn(x[0], o[0], o[1], o[3]), 3 * D * d * 4,
             dense_sets),
            ("fp32 separate", float_layers, lambda o, s: tk.sparse_ffn_c(x, *o[:3], s, y), 3 * k * d * 4, sets),
            ("q8_0 bundled", q8_layers, lambda o, s: tk.sparse_ffn_q_c(x, *o, s, y, "q8_0"),
             3 * k * quant.row_bytes("q8_0", d), sets)):
        plain = make(d, D, False)
        huge = make(d, D, True)
        name = f"{kind} {d}x{D}" + ("" if kind_sets is dense_sets else f" keep {keep}")
        row = ab(name, lambda: pass_gbps(call, plain, kind_sets, nbytes),
                 lambda: pass_gbps(call, huge, kind_sets, nbytes), rounds)
        row["huge_page_share"] = {side: round(huge_share([t for ops in lay for t in ops]), 3)
                                  for side, lay in (("plain", plain), ("huge", huge))}
        rows.append(row)
        del plain, huge
        gc.collect()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--shape", default="2048x8192", help="d x D of the kernel rows")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--json", type=Path, help="also write the rows and the machine here")
    a = p.parse_args(argv)
    d, D = (int(v) for v in a.shape.lower().split("x"))
    torch.set_num_threads(a.threads)
    _C.set_num_threads(a.threads)
    info = _bench_module("conftest").machine_info()
    mode = thp_mode()
    print(f"{info.get('cpu', '?')}, {a.threads} threads, ISA {_C.get_isa()}, decode tuning "
          f"{_C.get_decode_tuning()}, THP mode {mode or 'n/a'}", flush=True)
    if mode in ("always", "never", ""):
        print(f"note: THP mode {mode or 'unknown'}: both sides get the same pages, the A/B measures nothing")
    rows = read_rows(a.threads, a.rounds) + kernel_rows(d, D, a.keep, a.rounds)
    print(f"\n| case | 4 KiB pages (GB/s) | huge pages (GB/s) | huge / plain, per pair |\n|---|---|---|---|")
    for r in rows:
        pl, hu = r["plain"], r["huge"]
        print(f"| {r['case']} | {pl['median']:.1f} ({pl['min']:.1f}-{pl['max']:.1f}) | "
              f"{hu['median']:.1f} ({hu['min']:.1f}-{hu['max']:.1f}) | {r['ratio_median']:.2f}x "
              f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    for r in rows:
        if "huge_page_share" in r:
            h = r["huge_page_share"]
            print(f"{r['case']}: share of the weights' bytes in huge pages: plain side {h['plain']:.0%}, "
                  f"advised side {h['huge']:.0%}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": info, "thp_mode": mode, "threads": a.threads,
                                      "rounds": a.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
