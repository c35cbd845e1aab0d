"""Evaluation outputs: results.json (every number), report.md (tables), PNG plots."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["write_results", "markdown_report", "make_plots", "write_report"]

# Display order of the methods in tables and plots.
ORDER = ("dense", "oracle", "a-glass", "i-glass", "a-glass (text)", "global", "griffin", "random")


def _base(name: str) -> str:
    """'a-glass lam=0.75 (text)' -> 'a-glass (text)'."""
    parts = name.split(" ")
    base = parts[0]
    if name.endswith("(text)"):
        base += " (text)"
    return base


def _order_key(name: str) -> tuple:
    b = _base(name)
    return (ORDER.index(b) if b in ORDER else len(ORDER), name)


def write_results(res: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / "results.json"
    with open(p, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, sort_keys=False, default=float)
    return p


def _pct(x: float, ref: float) -> str:
    """x relative to ref, as a signed percentage ("-12.3%")."""
    return f"{100 * (x / ref - 1):+.1f}%" if ref else "-"


def _fmt(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def _heldout_table(h: dict, keep: float) -> list[str]:
    rows = [r | {"key": k} for k, r in h["results"].items() if k == "dense" or r["keep"] == keep]
    rows.sort(key=lambda r: _order_key(r.get("name", r["method"])))
    griffin = next((r for r in rows if r["method"] == "griffin"), None)
    lines = ["| method | KL(dense‖sparse) ± s.e. | vs GRIFFIN | perplexity | top-1 agreement |",
             "|---|---|---|---|---|"]
    for r in rows:
        name = r.get("name", r["method"])
        rel = "-"
        if griffin is not None and r["method"] not in ("dense",) and griffin["kl"] > 0:
            rel = _pct(r["kl"], griffin["kl"])
        lines.append(f"| {name} | {_fmt(r['kl'])} ± {_fmt(r['kl_sem'])} | {rel} | {_fmt(r['ppl'], 2)} | "
                     f"{_fmt(r['top1'])} |")
    return lines


def _keep_table(h: dict, metric: str, nd: int) -> list[str]:
    keeps = sorted({r["keep"] for k, r in h["results"].items() if k != "dense"}, reverse=True)
    names = sorted({r["name"] for k, r in h["results"].items() if k != "dense"}, key=_order_key)
    lines = ["| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
             "|---|" + "---|" * len(keeps)]
    for n in names:
        vals = []
        for k in keeps:
            r = next((r for kk, r in h["results"].items() if kk != "dense" and r["name"] == n and r["keep"] == k), None)
            vals.append(_fmt(r[metric], nd) if r else "-")
        lines.append(f"| {n} | " + " | ".join(vals) + " |")
    return lines


def _run_line(run: dict) -> str:
    s = run.get("settings") or {}
    parts = run.get("parts") or []
    bits = [" + ".join(parts) or "(no parts)"]
    if "heldout" in parts:
        bits.append(f"{s.get('n_heldout') or 'all'} held-out prompts, keeps {', '.join(map(str, s.get('keeps', [])))}")
    if "lambda_sweep" in parts:
        bits.append(f"{s.get('n_tune')} tune prompts")
    if "heldout" in parts or "lambda_sweep" in parts:
        bits.append(f"{s.get('gen_tokens')}-token continuations")
    if "prompt_length" in parts:
        targets = "/".join(map(str, s.get("length_targets") or []))
        bits.append(f"prompt length: {s.get('n_length')} tune prompts, +{targets} context tokens, "
                    f"{s.get('length_gen_tokens')}-token continuations")
    st = run.get("stats") or {}
    if st:
        bits.append("statistics " + ", ".join(f"{k} {v.get('num_sequences')}x{v.get('seq_len')} ({v.get('num_tokens')} tokens)"
                                               for k, v in st.items()))
    m = run.get("machine") or {}
    if m.get("cpu"):
        bits.append(f"{m['cpu']} ({m.get('glass_isa', '-')})")
    if m.get("torch_threads"):
        bits.append(f"{m['torch_threads']} threads")
    if run.get("command"):
        bits.append(f"`{run['command']}`")
    return "; ".join(bits)


def markdown_report(res: dict, command: str | None = None) -> str:
    name = res["model"]
    L = [f"# GLASS evaluation: {name}", ""]
    s = res["settings"]
    m = res.get("machine", {})
    runs = res.get("runs") or []
    newest = " of the newest run (each run's in the list below)" if len(runs) > 1 else ""
    newest_stats = ", the newest run's" if len(runs) > 1 else ""
    L += [f"Machine{newest}: {m.get('cpu', '?')}, {m.get('torch_threads', '?')} torch threads, torch {m.get('torch')}, "
          f"C++ core: {m.get('glass_ext')} ({m.get('glass_isa', '-')}). Model in fp32 (the shipped checkpoints are "
          f"4-bit GGUF files, dequantized at load), "
          f"{'chat template' if res.get('chat_template') else 'raw prompt'}.", ""]
    if command:
        L += ["Command:", "", f"    {command}", ""]
    L += ["Protocol (glass_kernels/evaluation/run.py): the dense model continues each prompt greedily "
          f"for {s['gen_tokens']} tokens (EOS suppressed); each method, its neurons chosen from the prompt "
          "only, is scored on that continuation teacher-forced (positions 2..N, all decoded sparse): "
          "mean KL(p_dense ‖ p_sparse) per token, perplexity of the continuation, top-1 agreement with "
          "the dense argmax. Oracle = the top-k of the same activation statistic computed on the "
          "continuation itself (an upper reference, not a method). Global statistics: NPS "
          f"({res['stats']['nps']['num_sequences']} self-generated sequences x {res['stats']['nps']['seq_len']} "
          f"tokens, {res['stats']['nps']['num_tokens']} tokens{newest_stats}) "
          f"unless marked (text) = {res['stats']['text']['text']} ({res['stats']['text']['num_tokens']} tokens). "
          "Each machine calibrates its own statistics (float results differ in their last bits between CPUs, "
          "which changes some greedy choices of the self-generated text), so their token counts identify them.", ""]
    if len(runs) > 1:
        L += [f"This report merges {len(runs)} runs (`--merge`); a later run's part replaces an earlier one's, "
              "so the newest run that has a part is the one shown:", ""]
        L += [f"- run {i + 1}: {_run_line(r)}" for i, r in enumerate(runs)] + [""]
    lu = res.get("lam_used", {})
    if lu:
        L += [f"lambda used on the held-out prompts: A-GLASS {lu.get('a-glass')}, I-GLASS {lu.get('i-glass')} "
              f"({lu.get('chosen_by')}).", ""]
    h = res.get("heldout")
    if h:
        L += [f"## Held-out prompts ({len(h['prompts'])} prompts, mean {h['prompt_tokens_mean']:.1f} prompt tokens)", ""]
        keeps = sorted({r["keep"] for k, r in h["results"].items() if k != "dense"}, reverse=True)
        main_keep = 0.5 if 0.5 in keeps else keeps[0]
        L += [f"### keep {main_keep:g}", ""] + _heldout_table(h, main_keep) + [""]
        L += [verdict(h, main_keep), ""]
        if len(keeps) > 1:
            L += ["### KL vs keep", ""] + _keep_table(h, "kl", 3) + [""]
            L += ["### Perplexity vs keep (dense: " + _fmt(h["results"]["dense"]["ppl"], 2) + ")", ""]
            L += _keep_table(h, "ppl", 2) + [""]
            L += ["### Top-1 agreement vs keep", ""] + _keep_table(h, "top1", 3) + [""]
        jac = h.get("jaccard", {})
        if jac:
            L += ["### Jaccard overlap with the oracle set (mean over layers; per layer in results.json and "
                  "jaccard_layers.png)", ""]
            variants = sorted({v for d in jac.values() for v in d})
            L += ["| keep | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
            for keep in sorted(jac, key=float, reverse=True):
                vals = [jac[keep].get(v) for v in variants]
                L.append(f"| {float(keep):g} | " + " | ".join(_fmt(sum(x) / len(x)) if x else "-" for x in vals) + " |")
            k5 = jac.get(str(main_keep)) or jac.get(main_keep)
            if k5 and "aggregated (A)" in k5 and "local" in k5 and "global" in k5:
                agg, loc, glo = k5["aggregated (A)"], k5["local"], k5["global"]
                n_best = sum(a >= max(lo, g) for a, lo, g in zip(agg, loc, glo))
                L += ["", f"At keep {main_keep:g}, aggregated (A) selection overlaps the oracle at least as much "
                          f"as both local-only and global-only in {n_best} of {len(agg)} layers."]
            L += [""]
    sw = res.get("lambda_sweep")
    if sw:
        L += [f"## lambda sweep (tune split, {len(sw['prompts'])} prompts)", ""]
        rows = [r for k, r in sw["results"].items() if k != "dense"]
        keeps = sorted({r["keep"] for r in rows}, reverse=True)
        lams = sorted({r["lam"] for r in rows})
        for keep in keeps:
            L += [f"KL at keep {keep:g} (lambda 0 = GRIFFIN for A; lambda 1 = global only):", "",
                  "| variant | " + " | ".join(f"{l:g}" for l in lams) + " |", "|---|" + "---|" * len(lams)]
            for meth in ("a-glass", "i-glass"):
                vals = []
                for l in lams:
                    r = next((r for r in rows if r["method"] == meth and r["lam"] == l and r["keep"] == keep), None)
                    vals.append(_fmt(r["kl"]) if r else "-")
                L.append(f"| {meth} | " + " | ".join(vals) + " |")
            L += [""]
        L += [f"Best lambda (lowest tune KL): A-GLASS {sw['best_lam']['a-glass']}, I-GLASS {sw['best_lam']['i-glass']}.", ""]
    pl = res.get("prompt_length")
    if pl:
        gen_tokens = pl.get("gen_tokens", s.get("length_gen_tokens"))
        L += [f"## Prompt-length dependence (tune prompts {len(pl['prompts'])}, keep {pl['keep']}, A-GLASS, "
              f"{gen_tokens}-token continuations)", "",
              "Context = other prompts of the same kind prepended. KL by lambda (0 = GRIFFIN, 1 = global only); "
              "the last column is the best lambda's KL relative to GRIFFIN's (how much the prior still adds):", ""]
        lams = sorted({float(l) for r in pl["rows"] for l in r["by_lam"]})
        L += ["| context tokens | prompt tokens | " + " | ".join(f"{l:g}" for l in lams)
              + " | best lambda | best vs GRIFFIN |", "|---|---|" + "---|" * (len(lams) + 2)]
        for r in pl["rows"]:
            kl = {l: r["by_lam"][f"{l:g}"]["kl"] for l in lams}
            gain = _pct(kl[r["best_lam"]], kl[0.0]) if 0.0 in kl else "-"
            L.append(f"| +{r['context_tokens']} | {r['prompt_tokens_mean']:.0f} | "
                     + " | ".join(_fmt(kl[l]) for l in lams) + f" | {r['best_lam']:g} | {gain} |")
        L += [""]
    q = res.get("quant")
    if q:
        L += [f"## Quantized rows (held-out, {len(q['prompts'])} prompts)", "",
              "KL against the dense model in its float weights (the models are 4-bit GGUF checkpoints "
              "dequantized to fp32; int8 / int4 here re-quantize those fp32 FFN weights to Q8_0 / Q4_0 rows). "
              "FFN bytes = the FFN weight bytes one decode step reads, as a fraction of the fp32 dense model's "
              "(Q8_0: 34 bytes per 32 values, Q4_0: 18):", "",
              "| configuration | weights | keep | FFN bytes | KL ± s.e. | perplexity | top-1 agreement |",
              "|---|---|---|---|---|---|---|"]
        for r in q["results"].values():
            L.append(f"| {r.get('name', r['method'])} | {r.get('weights', 'float')} | {r['keep']:g} | "
                     f"{ffn_bytes_fraction(r):.3f} | {_fmt(r['kl'])} ± {_fmt(r['kl_sem'])} | {_fmt(r['ppl'], 2)} | "
                     f"{_fmt(r['top1'])} |")
        L += [""]
    a = res.get("adaptive")
    if a:
        from .adaptive_report import adaptive_markdown

        L += adaptive_markdown(a, bool(res.get("chat_template")))
    t = res.get("timing", {})
    if t:
        L += ["## Run time", "", ", ".join(f"{k} {v}" for k, v in t.items()), ""]
    L += [f"Plots: {', '.join(plot_names(res)) or 'none'}. Every number: results.json.", ""]
    return "\n".join(L)


# bytes per weight value, relative to fp32, of the formats the quantized-rows table compares
_BYTES_VS_FP32 = {"float": 1.0, "int8": 34 / (32 * 4), "int4": 18 / (32 * 4)}


def ffn_bytes_fraction(r: dict) -> float:
    """FFN weight bytes read per decode step as a fraction of the fp32 dense model's (keep x format)."""
    return r["keep"] * _BYTES_VS_FP32[r.get("weights", "float")]


def plot_names(res: dict) -> list[str]:
    """The plots make_plots writes for these results (a part that did not run has none)."""
    h = res.get("heldout") or {}
    return [name for name, present in (("quality_vs_keep.png", bool(h)),
                                       ("jaccard_layers.png", bool(h.get("jaccard"))),
                                       ("kl_vs_lambda.png", bool(res.get("lambda_sweep"))),
                                       ("prompt_length.png", bool(res.get("prompt_length"))),
                                       ("quantized_rows.png", bool(res.get("quant"))),
                                       ("adaptive_length.png", bool(res.get("adaptive")))) if present]


def _kl_order(v: dict, ref: dict) -> int:
    """-1 / 1 when v's KL is lower / higher than ref's by more than twice the standard error of the
    difference (the two s.e. combined as if independent: conservative, the prompts are shared), else 0."""
    se = math.sqrt(v.get("kl_sem", 0.0) ** 2 + ref.get("kl_sem", 0.0) ** 2)
    diff = v["kl"] - ref["kl"]
    return 0 if abs(diff) <= 2 * se else (-1 if diff < 0 else 1)


def verdict(h: dict, keep: float) -> str:
    """One honest sentence: does GLASS beat GRIFFIN at this keep on the held-out prompts?"""
    r = {v["name"]: v for k, v in h["results"].items() if k != "dense" and v["keep"] == keep}
    g = next((v for n, v in r.items() if v["method"] == "griffin"), None)
    a = next((v for n, v in r.items() if v["method"] == "a-glass" and v["stats"] == "nps"), None)
    i = next((v for n, v in r.items() if v["method"] == "i-glass" and v["stats"] == "nps"), None)
    gl = next((v for n, v in r.items() if v["method"] == "global" and v["stats"] == "nps"), None)
    at = next((v for n, v in r.items() if v["method"] == "a-glass" and v["stats"] == "text"), None)
    if g is None or a is None:
        return ""
    out = []
    for label, v in (("A-GLASS", a), ("I-GLASS", i)):
        if v is None:
            continue
        dk = 100 * (v["kl"] / g["kl"] - 1)
        dp = 100 * (v["ppl"] / g["ppl"] - 1)
        word = {-1: "beats", 0: "is within the standard errors of", 1: "does NOT beat"}[_kl_order(v, g)]
        out.append(f"{label} {word} GRIFFIN (KL {dk:+.1f}%, perplexity {dp:+.1f}%)")
    s = f"**At keep {keep:g}: " + "; ".join(out) + ".**"
    if gl is not None:
        s += (f" Global-only (NPS) KL {gl['kl']:.3f} vs A-GLASS {a['kl']:.3f}: "
              + {-1: "aggregation adds over the global prior.",
                 0: "within the standard errors: no evidence that aggregation adds over the global prior.",
                 1: "aggregation is worse than the global prior alone."}[_kl_order(a, gl)])
    if at is not None:
        s += (f" NPS vs text statistics for A-GLASS: KL {a['kl']:.3f} vs {at['kl']:.3f} "
              f"({_pct(a['kl'], at['kl'])}).")
    return s


def _save(fig, path: Path) -> Path:
    """Lay out, write (110 dpi PNG) and close one figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(res: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    name = res["model"]
    h = res.get("heldout")
    if h:
        rows = [r for k, r in h["results"].items() if k != "dense"]
        names = sorted({r["name"] for r in rows}, key=_order_key)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for metric, ax, title in (("kl", axes[0], "KL(dense || sparse) per token"),
                                  ("ppl", axes[1], "perplexity of the continuation"),
                                  ("top1", axes[2], "top-1 agreement with dense")):
            for n in names:
                pts = sorted((r["keep"], r[metric]) for r in rows if r["name"] == n)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n,
                        linestyle="--" if n.startswith(("oracle", "random")) else "-")
            if metric == "ppl":
                ax.axhline(h["results"]["dense"]["ppl"], color="k", lw=0.8, label="dense")
            if metric in ("kl", "ppl"):
                ax.set_yscale("log")
            ax.set_xlabel("keep (fraction of FFN neurons)")
            ax.set_title(title)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{name}: held-out prompts ({len(h['prompts'])})")
        paths.append(_save(fig, out_dir / "quality_vs_keep.png"))
        jac = h.get("jaccard", {})
        if jac:
            keeps = sorted(jac, key=float, reverse=True)
            fig, axes = plt.subplots(1, len(keeps), figsize=(4.5 * len(keeps), 4), squeeze=False)
            for ax, keep in zip(axes[0], keeps):
                for v, vals in sorted(jac[keep].items()):
                    ax.plot(range(len(vals)), vals, marker=".", label=v)
                ax.set_title(f"keep {float(keep):g}")
                ax.set_xlabel("layer")
                ax.set_ylabel("Jaccard with oracle set")
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.suptitle(f"{name}: Jaccard of the chosen neurons\nwith the oracle (continuation) set", fontsize=10)
            paths.append(_save(fig, out_dir / "jaccard_layers.png"))
    sw = res.get("lambda_sweep")
    if sw:
        rows = [r for k, r in sw["results"].items() if k != "dense"]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for meth in ("a-glass", "i-glass"):
            for keep in sorted({r["keep"] for r in rows}, reverse=True):
                pts = sorted((r["lam"], r["kl"]) for r in rows if r["method"] == meth and r["keep"] == keep)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{meth} keep {keep:g}")
        ax.set_xlabel("lambda (0 = local only / GRIFFIN, 1 = global only)")
        ax.set_ylabel("KL(dense || sparse)")
        ax.set_title(f"{name}: lambda sweep, tune split ({len(sw['prompts'])} prompts)")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out_dir / "kl_vs_lambda.png"))
    pl = res.get("prompt_length")
    if pl:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for r in pl["rows"]:
            lams = sorted(float(l) for l in r["by_lam"])
            axes[0].plot(lams, [r["by_lam"][f"{l:g}"]["kl"] for l in lams], marker="o",
                         label=f"{r['prompt_tokens_mean']:.0f} prompt tokens")
        axes[0].set_xlabel("lambda")
        axes[0].set_ylabel("KL")
        axes[0].set_title("KL vs lambda by prompt length")
        axes[0].legend(fontsize=8)
        axes[0].grid(alpha=0.3)
        x = [r["prompt_tokens_mean"] for r in pl["rows"]]
        axes[1].plot(x, [r["by_lam"]["0"]["kl"] for r in pl["rows"]], marker="o", label="GRIFFIN (lambda 0)")
        axes[1].plot(x, [min(v["kl"] for v in r["by_lam"].values()) for r in pl["rows"]], marker="o",
                     label="A-GLASS, best lambda")
        if all("1" in r["by_lam"] for r in pl["rows"]):
            axes[1].plot(x, [r["by_lam"]["1"]["kl"] for r in pl["rows"]], marker="o", linestyle="--",
                         label="global only (lambda 1)")
        for xi, r in zip(x, pl["rows"]):
            axes[1].annotate(f"λ*={r['best_lam']:g}", (xi, min(v["kl"] for v in r["by_lam"].values())),
                             fontsize=8, textcoords="offset points", xytext=(0, -12))
        axes[1].set_xlabel("prompt tokens (mean)")
        axes[1].set_ylabel("KL")
        axes[1].set_title("GRIFFIN vs A-GLASS vs prompt length")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
        fig.suptitle(f"{name}: prompt-length dependence (keep {pl['keep']})")
        paths.append(_save(fig, out_dir / "prompt_length.png"))
    q = res.get("quant")
    if q:
        paths.append(_plot_quant(q, name, out_dir / "quantized_rows.png"))
    a = res.get("adaptive")
    if a:
        from .adaptive_report import plot_adaptive

        paths.append(plot_adaptive(a, name, out_dir / "adaptive_length.png"))
    return paths


def _plot_quant(q: dict, name: str, path: Path) -> Path:
    """KL against FFN bytes read per decode step: one point per configuration, a line per keep."""
    import matplotlib.pyplot as plt

    rows = [r for r in q["results"].values() if r["method"] != "dense" or r.get("weights", "float") != "float"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in sorted({(r["method"], r["keep"]) for r in rows}, key=lambda x: -x[1]):
        pts = sorted((ffn_bytes_fraction(r), r["kl"], r["kl_sem"], r.get("weights", "float"))
                     for r in rows if (r["method"], r["keep"]) == label)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=f"{label[0]} keep {label[1]:g}")
        for x, y, _, w in pts:
            ax.annotate(w, (x, y), fontsize=8, textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_yscale("log")  # the float dense reference (KL 0) is not plotted
    ax.set_xlabel("FFN weight bytes per decode step (fraction of fp32 dense)")
    ax.set_ylabel("KL(dense fp32 || configuration)")
    ax.set_title(f"{name}: quantized rows, held-out prompts ({len(q['prompts'])})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return _save(fig, path)


def write_report(res: dict, out_dir: Path, command: str | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [write_results(res, out_dir)]
    md = out_dir / "report.md"
    md.write_text(markdown_report(res, command), encoding="utf-8")
    paths.append(md)
    if plotting_available():
        paths += make_plots(res, out_dir)
    else:
        logger.warning("glass_kernels: tables written, no plots: matplotlib is not installed "
                       "(pip install 'glass_kernels[plot]')")
    return paths


def plotting_available() -> bool:
    """Whether matplotlib (the `plot` extra) is installed; without it reports have tables only."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
