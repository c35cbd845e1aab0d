"""Turns the JSON of `pytest benchmarks/test_kernels.py --benchmark-json=FILE` into the markdown
tables of the README: per case the median time, GB/s, and the ratios to torch dense and to the
torch compacted copy of the same run; then the bandwidth and selection-cost rows; last, the summary
the README shows (the faster gathered layout per case; the median and range over runs when given
several JSON files of the same command).

    python benchmarks/kernel_table.py kernels.json [more.json ...] [> table.md]
"""
from __future__ import annotations

import argparse
import json
import sys


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def _stream_of(e: dict, run_stream: dict) -> float | None:
    """The STREAM figure a case is judged against: its own (measured just before and after it,
    test_kernels.local_stream_gbps), else the run's STREAM test (JSON files from before that)."""
    return e.get("stream_gbps") or run_stream.get(e.get("threads"))


def _drifted(e: dict, limit: float = 0.15) -> bool:
    """The bandwidth moved by more than ``limit`` between just before and just after the case."""
    a, b = e.get("stream_before_gbps"), e.get("stream_after_gbps")
    return bool(a and b) and abs(a - b) / min(a, b) > limit


def _pct(e: dict, run_stream: dict) -> str:
    st = _stream_of(e, run_stream)
    if not st or not e.get("gbps"):
        return ""
    return f"{100 * e['gbps'] / st:.0f}%" + (" ~" if _drifted(e) else "")


def tables(data: dict) -> str:
    benches = data.get("benchmarks", [])
    decode = _decode_cases(data)
    # the run's STREAM-like read per thread count (the faster of torch.sum and the plain read probe):
    # the bound of cases that carry no STREAM figure of their own
    stream: dict = {}
    for b in benches:
        e = b["extra_info"]
        if e.get("impl") in ("stream_sum", "stream_read") and e.get("gbps"):
            stream[e.get("threads")] = max(stream.get(e.get("threads"), 0.0), e["gbps"])
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
        local = [b["extra_info"]["stream_gbps"] for b in decode if b["extra_info"].get("stream_gbps")]
        if local:
            drifted = sum(_drifted(b["extra_info"]) for b in decode)
            lines.append(f"% of STREAM: against the STREAM-like read measured just before and just after each case "
                         f"(their mean; {min(local):.1f} to {max(local):.1f} GB/s over the run); "
                         f"{drifted} case(s) marked ~ where it moved by more than 15% across the case")
        lines.append("")
    if decode:
        lines += ["| d x D | dtype | threads | keep | impl | in flight / prefetch | median ms | GB/s | % of STREAM "
                  "| x dense | x compact |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for b in decode:
            e = b["extra_info"]
            sd = e.get("speedup_vs_dense")
            sc = e.get("speedup_vs_compact")
            pct = _pct(e, stream)
            fl = f"{e['neurons_in_flight']} / {e['prefetch_neurons']}" if "neurons_in_flight" in e else ""
            lines.append(
                f"| {e['d']}x{e['D']} | {e['dtype']} | {e['threads']} | {e['keep']} | {e['impl']} | {fl} | "
                f"{_fmt_ms(b['stats']['median'])} | {e.get('gbps', '')} | {pct} | "
                f"{'' if sd is None else f'{sd:.2f}'} | {'' if sc is None else f'{sc:.2f}'} |")
        lines.append("")
        slower = [e for e in faster_layouts(decode).values() if e.get("speedup_vs_compact", 1.0) < 0.95]
        if slower:
            lines.append("**The gathered kernel is slower than the compacted copy (by more than 5%) here:** " + "; ".join(
                f"{e['d']}x{e['D']} {e['dtype']} keep {e['keep']} ({e['impl']} {e['speedup_vs_compact']:.2f}x)"
                for e in slower)
                + ". On this machine and shape a per-prompt copy of the selected rows would decode faster, at the"
                " cost of keep x the FFN's bytes of extra memory.")
            lines.append("")
    lines += _quantized_table(decode, stream)
    if other:
        lines += ["| measurement | threads | median ms | GB/s | % of dense prefill |", "|---|---|---|---|---|"]
        for b in other:
            e = b["extra_info"]
            pct = e.get("pct_of_dense_prefill", e.get("stats_plus_select_pct_of_prefill", ""))
            lines.append(f"| {e.get('impl', b['name'])} | {e.get('threads', '')} | "
                         f"{_fmt_ms(b['stats']['median'])} | {e.get('gbps', '')} | {pct} |")
        lines.append("")
    return "\n".join(lines)


def _decode_cases(data: dict) -> list:
    return [b for b in data.get("benchmarks", []) if b["extra_info"].get("impl") in
            ("dense", "compact", "sparse1", "sparse", "bundled", "q8_0", "q4_0")]


def faster_layouts(decode: list) -> dict:
    """Per case (d, D, dtype, threads, keep) the extra_info of the faster of the two gathered layouts,
    what patch's layout="auto" would take (the same bytes, so the higher GB/s)."""
    best: dict = {}
    for b in decode:
        e = b["extra_info"]
        if e.get("impl") in ("sparse", "bundled") and e.get("gbps"):
            k = (e["d"], e["D"], e["dtype"], e["threads"], e["keep"])
            if k not in best or e["gbps"] > best[k]["gbps"]:
                best[k] = e
    return best


def _spread(values: list, fmt: str, unit: str = "") -> str:
    """One run's value, or the median (min-max) of several."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return ""
    if len(values) == 1:
        return format(values[0], fmt) + unit
    n = len(values)
    med = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    return f"{format(med, fmt)}{unit} ({format(values[0], fmt)}-{format(values[-1], fmt)}{unit})"


def summary(runs: list) -> str:
    """The README's table: per case the faster gathered layout of each run (its layout and neurons
    in flight), its GB/s, % of the STREAM-like read beside it, and its speed-up over torch dense and
    over the compacted copy of the same run; with several runs, the median (min-max) over them."""
    per_run = [faster_layouts(_decode_cases(r)) for r in runs]
    keys = sorted({k for run in per_run for k in run}, key=lambda k: (k[0] * k[1], k[2] != "float32", k[2], k[3], -k[4]))
    lines = [f"The faster gathered layout per case ({len(runs)} run(s); median (min-max) over runs where "
             "several; ~ = the STREAM-like read moved by more than 15% across the case in that many runs):", "",
             "| d x D | dtype | threads | keep | layout (in flight) | GB/s | % of STREAM | x torch dense "
             "| x compacted copy |", "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        es = [run[k] for run in per_run if k in run]
        layouts = ", ".join(f"{e['impl']} ({e.get('neurons_in_flight', '?')})" for e in es)
        pct = [100 * e["gbps"] / e["stream_gbps"] for e in es if e.get("stream_gbps")]
        drifted = sum(_drifted(e) for e in es)
        lines.append(f"| {k[0]}x{k[1]} | {k[2]} | {k[3]} | {k[4]} | {layouts} | {_spread([e['gbps'] for e in es], '.1f')}"
                     f" | {_spread(pct, '.0f', '%')}{' ' + '~' * drifted if drifted else ''} | "
                     f"{_spread([e.get('speedup_vs_dense') for e in es], '.2f')} | "
                     f"{_spread([e.get('speedup_vs_compact') for e in es], '.2f')} |")
    return "\n".join(lines + [""])


def _quantized_table(decode: list, stream: dict) -> list[str]:
    """Quantized rows against the same run's float cases: torch dense fp32 and bf16 (same shape and
    threads) and the fp32 gathered kernel at the same keep (the faster of its two layouts)."""
    def median(impl, dtype, e, keep=None):
        ms = [b["stats"]["median"] for b in decode if b["extra_info"]["impl"] == impl
              and b["extra_info"]["dtype"] == dtype and (b["extra_info"]["d"], b["extra_info"]["D"],
              b["extra_info"]["threads"]) == (e["d"], e["D"], e["threads"])
              and (keep is None or b["extra_info"]["keep"] == keep)]
        return min(ms) if ms else None

    def ratio(ref, t):
        return "" if ref is None else f"{ref / t:.2f}"

    rows = [b for b in decode if b["extra_info"]["impl"] in ("q8_0", "q4_0")]
    if not rows:
        return []
    out = ["Quantized rows (GB/s counts the quantized bytes read; x = speed-up over that run's case):", "",
           "| d x D | threads | keep | format | median ms | GB/s | % of STREAM | x dense fp32 | x dense bf16 "
           "| x gathered fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in rows:
        e, t = b["extra_info"], b["stats"]["median"]
        pct = _pct(e, stream)
        gathered = [m for m in (median("sparse", "float32", e, e["keep"]), median("bundled", "float32", e, e["keep"]))
                    if m is not None]
        out.append(f"| {e['d']}x{e['D']} | {e['threads']} | {e['keep']} | {e['impl']} | {_fmt_ms(t)} | "
                   f"{e.get('gbps', '')} | {pct} | "
                   f"{ratio(median('dense', 'float32', e), t)} | {ratio(median('dense', 'bfloat16', e), t)} | "
                   f"{ratio(min(gathered) if gathered else None, t)} |")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) of the same command")
    args = ap.parse_args(argv)
    runs = []
    for path in args.json:
        with open(path) as f:
            runs.append(json.load(f))
    for data in runs:
        sys.stdout.write(tables(data) + "\n")
    sys.stdout.write(summary(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
