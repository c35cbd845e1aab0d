"""Turns the JSON of `pytest benchmarks/test_kernels.py --benchmark-json=FILE` into the markdown
tables of the README: per case the median time, GB/s, and the ratios to torch dense and to the
torch compacted copy of the same run; then the bandwidth and selection-cost rows.

    python benchmarks/kernel_table.py kernels.json [> table.md]
"""
from __future__ import annotations

import argparse
import json
import sys


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def tables(data: dict) -> str:
    benches = data.get("benchmarks", [])
    decode = [b for b in benches if b["extra_info"].get("impl") in ("dense", "compact", "sparse1", "sparse", "bundled")]
    # the run's STREAM-like read per thread count: each decode case as a fraction of it
    stream = {b["extra_info"].get("threads"): b["extra_info"].get("gbps") for b in benches
              if b["extra_info"].get("impl") == "stream_sum"}
    other = [b for b in benches if b not in decode]
    lines = []
    if benches:
        ei = benches[0]["extra_info"]
        lines.append(f"Machine: {ei.get('cpu', '?')}, {ei.get('cores', '?')} cores, ISA "
                     f"{ei.get('isa', '?')}, torch {ei.get('torch', '?')}, glass_kernels "
                     f"{ei.get('glass_kernels', '?')} (commit {ei.get('glass_kernels_commit', '?')}); "
                     f"{data.get('datetime', '')}")
        loads = [b["extra_info"].get("loadavg_1m") for b in benches if "loadavg_1m" in b["extra_info"]]
        if loads:
            lines.append(f"Load average during the run (1 min, own threads included): {min(loads):.1f} to "
                         f"{max(loads):.1f}")
        others = [b["extra_info"]["other_load_cores"] for b in benches if "other_load_cores" in b["extra_info"]]
        if others:
            lines.append(f"Other processes' CPU use during the cases: {min(others):.2f} to {max(others):.2f} cores")
        lines.append("")
    if decode:
        lines += ["| d x D | dtype | threads | keep | impl | in flight / prefetch | median ms | GB/s | % of STREAM "
                  "| x dense | x compact |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for b in decode:
            e = b["extra_info"]
            sd = e.get("speedup_vs_dense")
            sc = e.get("speedup_vs_compact")
            st = stream.get(e["threads"])
            pct = f"{100 * e['gbps'] / st:.0f}%" if st and e.get("gbps") else ""
            fl = f"{e['neurons_in_flight']} / {e['prefetch_neurons']}" if "neurons_in_flight" in e else ""
            lines.append(
                f"| {e['d']}x{e['D']} | {e['dtype']} | {e['threads']} | {e['keep']} | {e['impl']} | {fl} | "
                f"{_fmt_ms(b['stats']['median'])} | {e.get('gbps', '')} | {pct} | "
                f"{'' if sd is None else f'{sd:.2f}'} | {'' if sc is None else f'{sc:.2f}'} |")
        lines.append("")
        # per case the faster of the two gathered layouts (what patch's layout="auto" would take)
        best: dict = {}
        for b in decode:
            e = b["extra_info"]
            if e.get("impl") in ("sparse", "bundled"):
                k = (e["d"], e["D"], e["dtype"], e["threads"], e["keep"])
                if k not in best or e.get("speedup_vs_compact", 0) > best[k].get("speedup_vs_compact", 0):
                    best[k] = e
        slower = [e for e in best.values() if e.get("speedup_vs_compact", 1.0) < 0.95]
        if slower:
            lines.append("**The gathered kernel is slower than the compacted copy (by more than 5%) here:** " + "; ".join(
                f"{e['d']}x{e['D']} {e['dtype']} keep {e['keep']} ({e['impl']} {e['speedup_vs_compact']:.2f}x)"
                for e in slower)
                + ". On this machine and shape a per-prompt copy of the selected rows would decode faster, at the"
                " cost of keep x the FFN's bytes of extra memory.")
            lines.append("")
    if other:
        lines += ["| measurement | threads | median ms | GB/s | % of dense prefill |", "|---|---|---|---|---|"]
        for b in other:
            e = b["extra_info"]
            pct = e.get("pct_of_dense_prefill", e.get("stats_plus_select_pct_of_prefill", ""))
            lines.append(f"| {e.get('impl', b['name'])} | {e.get('threads', '')} | "
                         f"{_fmt_ms(b['stats']['median'])} | {e.get('gbps', '')} | {pct} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark JSON file")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    sys.stdout.write(tables(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
