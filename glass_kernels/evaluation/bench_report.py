"""pytest-benchmark JSON -> markdown report + plot, with a history of runs for comparison.

    python -m glass_kernels bench [run.json] [--compare last|history/<ts>.json] [--out reports/bench]

Without a JSON it runs ``pytest benchmarks/test_e2e.py --benchmark-only --benchmark-json=...``.
Each report copies its input to ``<out>/history/<UTC timestamp>.json``; ``--compare`` puts the
medians of a previous run next to this one's (ratio > 1 = this run is slower).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["load_bench", "e2e_rows", "markdown", "plot_speedup", "compare_runs", "write_bench_report",
           "run_and_report"]


def load_bench(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list)")
    return doc


def _is_dense(info: dict) -> bool:
    """The unpatched case (files from before the method was recorded: the keep-1.0 case)."""
    return info["method"] == "dense" if "method" in info else float(info.get("keep", 1.0)) == 1.0


def e2e_rows(doc: dict) -> dict:
    """Group the end-to-end cases: {model: {"share": f, "decode": {keep: info}, "ttft": {keep: info},
    "dense": {"decode": info | None, "ttft": info | None}}}; "decode" / "ttft" hold the patched cases
    only (a patched keep 1.0 is a case of its own, not the dense one)."""
    out: dict = {}
    for b in doc["benchmarks"]:
        info = b.get("extra_info") or {}
        kind, model = info.get("kind"), info.get("model")
        if kind not in ("mlp_share", "decode", "ttft") or model is None:
            continue
        m = out.setdefault(model, {"share": None, "decode": {}, "ttft": {}, "dense": {"decode": None, "ttft": None}})
        med = b["stats"]["median"]
        if kind == "mlp_share":
            m["share"] = info.get("mlp_share")
            continue
        row = dict(info, median_s=med, iqr_s=b["stats"].get("iqr"), rounds=b["stats"].get("rounds"), name=b["name"])
        if _is_dense(info):
            m["dense"][kind] = row
        else:
            m[kind][float(info.get("keep", 1.0))] = row
    # speed-ups recomputed from the medians (a filtered run may lack the dense case's extra_info link)
    for m in out.values():
        dense = m["dense"]["decode"]
        for keep, r in m["decode"].items():
            if m["share"] is None and r.get("mlp_share") is not None:
                m["share"] = r["mlp_share"]
            if r.get("dense_paired_median_s"):  # dense runs interleaved with this case's (test_e2e.py)
                r["speedup"] = r["dense_paired_median_s"] / r["median_s"]
            elif dense is not None:
                r["speedup"] = dense["median_s"] / r["median_s"]
            if m["share"] is not None:
                f = m["share"]
                r["amdahl_ceiling"] = 1.0 / ((1.0 - f) + f * keep)
    return out


def other_rows(doc: dict) -> list[dict]:
    rows = []
    for b in doc["benchmarks"]:
        info = b.get("extra_info") or {}
        if info.get("kind") in ("mlp_share", "decode", "ttft"):
            continue
        rows.append({"name": b["name"], "group": b.get("group"), "median_ms": 1e3 * b["stats"]["median"],
                     "extra": {k: v for k, v in info.items() if k in ("impl", "gbps", "GB/s", "speedup", "threads",
                                                                     "keep", "isa", "dtype")}})
    return rows


def compare_runs(doc: dict, prev: dict) -> list[tuple[str, float, float, float]]:
    """(name, previous median s, this median s, this / previous) for benchmarks present in both."""
    pm = {b["fullname"] if "fullname" in b else b["name"]: b["stats"]["median"] for b in prev["benchmarks"]}
    out = []
    for b in doc["benchmarks"]:
        key = b["fullname"] if "fullname" in b else b["name"]
        if key in pm and pm[key] > 0:
            out.append((b["name"], pm[key], b["stats"]["median"], b["stats"]["median"] / pm[key]))
    return out


def _machine(doc: dict) -> str:
    mi = doc.get("machine_info") or {}
    cpu = (mi.get("cpu") or {}).get("brand_raw") if isinstance(mi.get("cpu"), dict) else mi.get("cpu")
    extra = {}
    for b in doc["benchmarks"]:
        extra = b.get("extra_info") or {}
        if extra:
            break
    threads = f" on {extra['threading']} threads" if extra.get("threading") else ""
    return (f"{extra.get('cpu') or cpu or '?'}, {extra.get('cores', '?')} cores, ISA {extra.get('isa', '?')}{threads}, "
            f"torch {extra.get('torch', '?')}, transformers {extra.get('transformers', '?')}, "
            f"glass_kernels {extra.get('glass_kernels', '?')} (commit {extra.get('glass_kernels_commit', '?')}), "
            f"1-min load average after the first case {extra.get('loadavg_1m', '?')}")


def _other_load(doc: dict) -> tuple[float, float] | None:
    """(mean, highest) cores' worth of CPU that other processes used during the cases (benchmarks/conftest.py
    measures it as machine busy time minus the benchmark's own); None for runs that did not record it."""
    vals = [b["extra_info"]["other_load_cores"] for b in doc["benchmarks"]
            if isinstance((b.get("extra_info") or {}).get("other_load_cores"), (int, float))]
    return (sum(vals) / len(vals), max(vals)) if vals else None


def _load_ratio(doc: dict) -> float | None:
    """Older runs only: highest 1-minute load average / cores (it includes the benchmark's own threads)."""
    vals = []
    for b in doc["benchmarks"]:
        e = b.get("extra_info") or {}
        if isinstance(e.get("loadavg_1m"), (int, float)) and isinstance(e.get("cores"), int) and e["cores"] > 0:
            vals.append(e["loadavg_1m"] / e["cores"])
    return max(vals) if vals else None


def _load_lines(doc: dict) -> list[str]:
    """What competed with the run, and a warning when it was enough to move the ratios."""
    other = _other_load(doc)
    if other is not None:
        mean, worst = other
        line = (f"Other processes used {mean:.2f} cores on average during the cases "
                f"(busiest case {worst:.2f}); the run's own threads are not counted.")
        if worst > 0.25:
            return [line, "", "**Warning: other processes competed with this run (up to "
                    f"{worst:.2f} cores): absolute times are inflated and ratios are noisy. Re-run on an idle "
                    "machine before quoting numbers.**", ""]
        return [line, ""]
    load = _load_ratio(doc)
    if load is not None and load > 1.0:
        return [f"**Warning: the machine was oversubscribed during this run (load average {load:.1f}x the core "
                "count, the run's own threads included): absolute times are inflated and ratios are noisy -- a "
                "speed-up above its Amdahl ceiling is noise, not a real effect. Re-run on an idle machine before "
                "quoting numbers.**", ""]
    return []


def _sparse_steps(r: dict, note: bool = True) -> str:
    """"n of m" decode steps that ran the sparse kernel (runs before the patch counted them: "-"), and
    (``note``) where the selection kept some layers whole, in how many layers the kernel ran."""
    if r.get("decode_steps") is None:
        return "-"
    return f"{r.get('sparse_decode_steps')} of {r['decode_steps']}{_kernel_layers_note(r) if note else ''}"


def _kernel_layers_note(r: dict) -> str:
    """schedule.kernel_layers_note of the case's recorded layer count (runs before it: "")."""
    from ..patch.schedule import kernel_layers_note

    layers = r.get("kernel_layers")
    return kernel_layers_note(tuple(layers) if layers else None)


def sparse_step_lines(doc: dict) -> list[str]:
    """One line per patched end-to-end case: its speed-up and how many decode steps ran sparse."""
    lines = []
    for model, m in e2e_rows(doc).items():
        for keep in sorted(m["decode"], reverse=True):
            r = m["decode"][keep]
            if r.get("decode_steps") is None:
                continue
            sp = r.get("speedup")
            warn = "" if r["sparse_decode_steps"] == r["decode_steps"] else "  <-- NOT ALL SPARSE: see the warnings above"
            lines.append(f"{model} keep {keep:g}: {'-' if sp is None else f'{sp:.2f}x'} of dense, "
                         f"{_sparse_steps(r, note=False)} decode steps ran sparse{_kernel_layers_note(r)}{warn}")
    return lines


def markdown(doc: dict, comparison=None, compare_name: str | None = None) -> str:
    L = ["# glass_kernels speed report", "",
         f"Run: {doc.get('datetime', '?')}; machine: {_machine(doc)}.", ""]
    L += _load_lines(doc)
    e2e = e2e_rows(doc)
    if e2e:
        L += ["## End to end (batch 1, fp32, greedy decode; prefill and selection excluded from tokens/s)", "",
              "Amdahl ceiling = 1 / ((1 - f) + f * keep), f = measured share of a dense decode step spent in the "
              "FFN modules; ideal = 1 / keep (the FFN alone). Speed-up: against a dense decode of the same length run "
              "just before each patched round (paired), where the run recorded it; else against the dense row.", ""]
        for model, m in e2e.items():
            f = m["share"]
            L += [f"### {model} (FFN share of a dense decode step: {f * 100:.1f}%)" if f is not None else f"### {model}", ""]
            tun = next((r["decode_tuning"] for r in m["decode"].values() if r.get("decode_tuning")), None)
            if tun:
                L += [f"Decode kernel: {tun}.", ""]
            L += ["| keep | method | threads | tokens/s | speed-up | Amdahl ceiling | ideal (FFN only) | decode steps sparse |",
                  "|---|---|---|---|---|---|---|---|"]
            if m["dense"]["decode"] is not None:
                r = m["dense"]["decode"]
                L.append(f"| dense | {r.get('method', 'dense')} | {r.get('threads')} | "
                         f"{r.get('tokens_per_s', float('nan')):.1f} | 1.00x | - | - | - |")
            for keep in sorted(m["decode"], reverse=True):
                r = m["decode"][keep]
                sp = r.get("speedup")
                ce = r.get("amdahl_ceiling")
                w = r.get("weights")
                meth = f"{r.get('method')} [{w}]" if w not in (None, "float") else r.get("method")
                L.append(f"| {keep:g} | {meth} | {r.get('threads')} | "
                         f"{r.get('tokens_per_s', float('nan')):.1f} | {'-' if sp is None else f'{sp:.2f}x'} | "
                         f"{'-' if ce is None else f'{ce:.2f}x'} | {1 / keep:.2f}x | {_sparse_steps(r)} |")
            quantized = [(k, r) for k, r in sorted(m["decode"].items(), reverse=True) if r.get("amdahl_ceiling_bytes")]
            if quantized:
                L += ["", f"[{quantized[0][1].get('weights')}] = FFN weights as quantized rows (the dense rounds run the "
                      "float model; the decode kernel line above is the setting measured on the quantized rows). Ceiling if the "
                      "FFN time shrank with its bytes (keep x quantized / fp32 bytes): "
                      + ", ".join(f"keep {k:g} {r['amdahl_ceiling_bytes']:.2f}x" for k, r in quantized) + "."]
            dense = m["dense"]["ttft"]
            if m["ttft"] or dense is not None:
                L += ["", "| time to first token | method | prompt tokens | ms | vs dense |", "|---|---|---|---|---|"]
                if dense is not None:
                    L.append(f"| dense | {dense.get('method', 'dense')} | {dense.get('prompt_tokens')} | "
                             f"{1e3 * dense['median_s']:.1f} | - |")
                for keep in sorted(m["ttft"], reverse=True):
                    r = m["ttft"][keep]
                    rel = "-" if dense is None else f"{r['median_s'] / dense['median_s']:.2f}x " \
                        f"(+{1e3 * (r['median_s'] - dense['median_s']):.1f} ms selection)"
                    L.append(f"| keep {keep:g} | {r.get('method')} | "
                             f"{r.get('prompt_tokens')} | {1e3 * r['median_s']:.1f} | {rel} |")
            L += [""]
    others = other_rows(doc)
    if others:
        L += ["## Other benchmarks (medians)", "", "| benchmark | median ms | info |", "|---|---|---|"]
        for r in others:
            L.append(f"| {r['name']} | {r['median_ms']:.3f} | {', '.join(f'{k}={v}' for k, v in r['extra'].items())} |")
        L += [""]
    if comparison:
        L += [f"## Compared with {compare_name}", "", "| benchmark | previous ms | this ms | this / previous |",
              "|---|---|---|---|"]
        for name, a, b, r in comparison:
            L.append(f"| {name} | {1e3 * a:.3f} | {1e3 * b:.3f} | {r:.3f} |")
        L += [""]
    L += ["Plot: speedup_vs_keep.png. Raw data: history/.", ""]
    return "\n".join(L)


def plot_speedup(doc: dict, path: Path) -> Path | None:
    e2e = e2e_rows(doc)
    if not any(m["decode"] for m in e2e.values()):
        return None  # nothing patched to plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    allk = sorted({k for m in e2e.values() for k in m["decode"]})
    grid = [k / 100 for k in range(15, 101)]
    ax.plot(grid, [1 / k for k in grid], color="k", lw=0.8, ls=":", label="ideal 1/keep (FFN only)")
    for i, (model, m) in enumerate(e2e.items()):
        color = f"C{i}"
        pts = sorted((k, r["speedup"]) for k, r in m["decode"].items() if r.get("speedup") is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=f"{model} measured")
        if m["share"] is not None:
            f = m["share"]
            ax.plot(grid, [1 / ((1 - f) + f * k) for k in grid], color=color, ls="--",
                    label=f"{model} Amdahl ceiling (FFN {100 * f:.0f}%)")
    ax.set_xlim(min(allk + [0.2]) - 0.05, 1.02)
    ax.set_ylim(0, max(2.0, 1 / (min(allk + [0.2]) - 0.05) * 0.6))
    ax.invert_xaxis()
    ax.set_xlabel("keep (fraction of FFN neurons)")
    ax.set_ylabel("decode speed-up vs dense")
    ax.set_title("End-to-end decode speed-up (batch 1, fp32)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _history_file(out_dir: Path, stamp: str | None = None) -> Path:
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return out_dir / "history" / f"{stamp}.json"


def _resolve_compare(out_dir: Path, compare: str | None, current: Path) -> Path | None:
    if not compare:
        return None
    if compare == "last":
        hist = sorted(p for p in (out_dir / "history").glob("*.json") if p.resolve() != current.resolve())
        if not hist:
            raise FileNotFoundError(f"--compare last: no earlier run in {out_dir / 'history'}")
        return hist[-1]
    p = Path(compare)
    if not p.exists():
        raise FileNotFoundError(f"--compare: {compare} does not exist")
    return p


def write_bench_report(json_path: str | os.PathLike, out_dir: Path, compare: str | None = None,
                       stamp: str | None = None) -> list[Path]:
    """Report on one pytest-benchmark JSON; keeps a copy in history/ (compare before the copy)."""
    out_dir = Path(out_dir)
    doc = load_bench(json_path)
    hist = _history_file(out_dir, stamp)
    prev_path = _resolve_compare(out_dir, compare, hist)
    comparison = compare_runs(doc, load_bench(prev_path)) if prev_path else None
    hist.parent.mkdir(parents=True, exist_ok=True)
    if Path(json_path).resolve() != hist.resolve():
        shutil.copyfile(json_path, hist)
    paths = [hist]
    md = out_dir / "report.md"
    md.write_text(markdown(doc, comparison, str(prev_path) if prev_path else None), encoding="utf-8")
    paths.append(md)
    from .report import plotting_available

    p = plot_speedup(doc, out_dir / "speedup_vs_keep.png") if plotting_available() else None
    if not plotting_available():
        logger.warning("glass_kernels: report written without its plot: matplotlib is not installed "
                       "(pip install 'glass_kernels[plot]')")
    if p:
        paths.append(p)
    return paths


def run_and_report(json_path=None, out_dir: Path = Path("reports/bench"), compare=None,
                   select: str = "benchmarks/test_e2e.py") -> int:
    tmp = None
    if json_path is None:
        tmp = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
        tmp.close()
        cmd = [sys.executable, "-m", "pytest", select, "--benchmark-only", f"--benchmark-json={tmp.name}", "-q"]
        print("running: " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0 or os.path.getsize(tmp.name) == 0:
            print(f"pytest failed (exit {rc}); no report written", file=sys.stderr)
            return rc or 1
        json_path = tmp.name
    try:
        paths = write_bench_report(json_path, out_dir, compare)
        for line in sparse_step_lines(load_bench(json_path)):
            print(line)
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
