"""`python -m glass_kernels eval` and `python -m glass_kernels bench` (called by glass_kernels.cli)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

__all__ = ["add_eval_arguments", "run_eval", "add_bench_arguments", "run_bench"]

EVAL_MODELS = ("smollm2", "gemma3-270m")  # the real models the evaluation runs by default (models.MODELS: every loadable one)


def _keeps(v: str) -> tuple:
    try:
        ks = tuple(float(x) for x in v.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keeps must be comma-separated floats in (0, 1], got {v!r}")
    if not ks or any(not (0.0 < k <= 1.0) for k in ks):
        raise argparse.ArgumentTypeError(f"--keeps must be comma-separated floats in (0, 1], got {v!r}")
    return ks


def _lams(v: str) -> tuple:
    try:
        ls = tuple(float(x) for x in v.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"lambdas must be comma-separated floats in [0, 1], got {v!r}")
    if not ls or any(not (0.0 <= l <= 1.0) for l in ls):
        raise argparse.ArgumentTypeError(f"lambdas must be comma-separated floats in [0, 1], got {v!r}")
    return ls


def _pos(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(EVAL_MODELS),
                   help=f"comma-separated model names (default: {','.join(EVAL_MODELS)})")
    p.add_argument("--quick", action="store_true",
                   help="a few prompts, short continuations, keep 0.5 only (a few minutes on 2 cores)")
    p.add_argument("--keeps", type=_keeps, default=None, help="keep fractions (default 0.5,0.4,0.3,0.2)")
    p.add_argument("--gen-tokens", type=_pos, default=None, help="continuation length (default 256)")
    p.add_argument("--n-heldout", type=_pos, default=None, help="held-out prompts used (default: all)")
    p.add_argument("--n-tune", type=_pos, default=None, help="tune prompts for the lambda sweep")
    p.add_argument("--sweep-lams", type=_lams, default=None, help="lambdas of the tune-split sweep")
    p.add_argument("--lam", type=float, default=None,
                   help="lambda for the held-out A-/I-GLASS rows (default: best of the tune sweep)")
    p.add_argument("--parts", default=None, help="comma-separated subset of sweep,heldout,length,adaptive,quant "
                   "(quant: the quantized-rows table, not in the default run)")
    p.add_argument("--batch-size", type=_pos, default=None)
    p.add_argument("--nps-sequences", type=_pos, default=None, help="NPS calibration sequences (default 64)")
    p.add_argument("--text-sequences", type=_pos, default=None, help="text calibration sequences (default 64)")
    p.add_argument("--stats-seq-len", type=_pos, default=None, help="calibration sequence length (default 256)")
    p.add_argument("--length-targets", default=None,
                   help="comma-separated context sizes (tokens) of the prompt-length study, e.g. 0,64,128")
    p.add_argument("--n-length", type=_pos, default=None, help="prompts of the prompt-length study")
    p.add_argument("--length-gen-tokens", type=_pos, default=None)
    p.add_argument("--threads", type=_pos, default=None, help="torch / C++ core threads")
    p.add_argument("--out", default="reports/eval", help="output folder (one subfolder per model)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge", action="store_true",
                   help="keep the parts of an existing <out>/<model>/results.json that this run does not redo "
                        "(run sweep / heldout / length separately, one report)")


def settings_from_args(args) -> "object":
    from .run import EvalSettings

    s = EvalSettings.quick() if args.quick else EvalSettings()
    over = {"keeps": args.keeps, "gen_tokens": args.gen_tokens, "n_heldout": args.n_heldout,
            "n_tune": args.n_tune, "sweep_lams": args.sweep_lams, "lam": args.lam,
            "batch_size": args.batch_size, "threads": args.threads, "nps_sequences": args.nps_sequences,
            "text_sequences": args.text_sequences, "stats_seq_len": args.stats_seq_len,
            "n_length": args.n_length, "length_gen_tokens": args.length_gen_tokens}
    if args.length_targets:
        try:
            over["length_targets"] = tuple(int(x) for x in args.length_targets.split(","))
        except ValueError:
            raise SystemExit(f"--length-targets must be comma-separated integers, got {args.length_targets!r}")
        if any(t < 0 for t in over["length_targets"]):
            raise SystemExit("--length-targets must be >= 0")
    if args.parts:
        parts = tuple(x.strip() for x in args.parts.split(","))
        bad = set(parts) - {"sweep", "heldout", "length", "adaptive", "quant"}
        if bad:
            raise SystemExit(f"--parts: unknown part(s) {sorted(bad)}; choose from sweep,heldout,length,adaptive,quant")
        over["parts"] = parts
    if args.lam is not None and not (0.0 <= args.lam <= 1.0):
        raise SystemExit(f"--lam must be in [0, 1], got {args.lam}")
    s = dataclasses.replace(s, **{k: v for k, v in over.items() if v is not None})
    s.progress = not args.no_progress
    return s


def run_eval(args) -> int:
    from .report import write_report
    from .run import evaluate_model

    settings = settings_from_args(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    command = "python -m glass_kernels eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "eval" else None
    for name in models:
        t0 = time.perf_counter()
        out = Path(args.out) / name
        old = _previous(out) if getattr(args, "merge", False) else None

        def merged(r):
            return merge_results(old, r) if old else r

        def checkpoint(r):
            r["command"] = command
            write_report(merged(r), out, command)

        res = evaluate_model(name, settings, checkpoint=checkpoint)
        res["command"] = command
        res = merged(res)
        paths = write_report(res, out, command)
        print(f"{name}: {time.perf_counter() - t0:.0f} s; wrote " + ", ".join(str(p) for p in paths))
        h = res.get("heldout")
        if h:
            from .report import verdict

            print(verdict(h, 0.5 if 0.5 in settings.keeps else settings.keeps[0]))
        sw = res.get("lambda_sweep")
        if sw:
            print(f"tune-split best lambda: {sw['best_lam']}")
    return 0


def _previous(out: Path) -> dict | None:
    import json

    p = out / "results.json"
    if not p.exists():
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _run_record(res: dict, parts: list) -> dict:
    return {"parts": parts, "settings": res.get("settings"), "timing": res.get("timing"),
            "stats": res.get("stats"), "machine": res.get("machine"), "command": res.get("command")}


def merge_results(old: dict, new: dict) -> dict:
    """new's parts replace old's; old's other parts stay, with their own settings and commands recorded."""
    out = dict(old)
    for k, v in new.items():
        if k in ("lambda_sweep", "heldout", "prompt_length", "adaptive", "quant"):
            out[k] = v
    oh, nh = old.get("heldout"), new.get("heldout")
    lam = lambda r: {k: v for k, v in (r.get("lam_used") or {}).items() if k != "chosen_by"}  # noqa: E731
    if oh and nh and oh["prompts"] == nh["prompts"] and lam(old) == lam(new):
        # same prompts and lambdas: further keeps are added to the earlier ones
        out["heldout"] = dict(nh, results={**oh["results"], **nh["results"]},
                              jaccard={**oh.get("jaccard", {}), **nh.get("jaccard", {})})
    if "heldout" in new and lam(old) != lam(new):
        # lam_used describes the held-out rows; a sweep-only run (or further keeps) must not relabel them
        out["lam_used"] = new["lam_used"]
    # machine and statistics describe the newest run (the held-out rows, if it has them); each run's
    # own are kept in "runs", so the report can say which part came from which sizes.
    for k in ("machine", "stats", "command"):
        if k in new:
            out[k] = new[k]
    parts = [k for k in ("lambda_sweep", "heldout", "prompt_length", "adaptive", "quant") if k in new]
    runs = list(old.get("runs", [_run_record(old, [k for k in ("lambda_sweep", "heldout", "prompt_length",
                                                                "adaptive", "quant") if k in old])]))
    runs.append(_run_record(new, parts))
    out["runs"] = runs
    # keyed by run number: two runs of the same part (e.g. further keeps) must not overwrite each other
    out["timing"] = {f"run {i} ({'+'.join(r['parts'])}): {k}": v
                     for i, r in enumerate(runs, 1) for k, v in (r.get("timing") or {}).items()}
    out["settings"] = new.get("settings", old.get("settings"))
    return out


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("json", nargs="?", default=None,
                   help="pytest-benchmark JSON (from `pytest benchmarks/ --benchmark-only --benchmark-json=F`); "
                        "default: run the end-to-end suite now")
    p.add_argument("--out", default="reports/bench", help="report folder (history/ inside)")
    p.add_argument("--compare", default=None,
                   help="a previous history JSON (or 'last') to compare with")
    p.add_argument("--select", default="benchmarks/test_e2e.py",
                   help="what pytest runs when no JSON is given (default: benchmarks/test_e2e.py)")


def run_bench(args) -> int:
    from .bench_report import run_and_report

    return run_and_report(json_path=args.json, out_dir=Path(args.out), compare=args.compare, select=args.select)
