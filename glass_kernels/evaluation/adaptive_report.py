"""The adaptive-selection study's section of report.md and its plot (results["adaptive"])."""

from __future__ import annotations

import math
from pathlib import Path

from ..adaptive import refine_summary

__all__ = ["adaptive_markdown", "plot_adaptive", "adaptive_verdict", "TARGET_GAIN"]

# The acceptance bar of the study: the best new option's KL, averaged over the length buckets, at
# least this much below the best single lambda's, and no bucket more than WORST_BUCKET worse.
TARGET_GAIN = 0.10
WORST_BUCKET = 0.02

NEW = ("length", "layer", "length+keep", "layer+keep", "length+keep-unrefined", "length+keep-all")


def _f(x, nd=3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _lam(tau: float, n: int) -> float:
    return 1.0 if math.isinf(tau) else tau / (tau + n)


def adaptive_verdict(summary: dict) -> str:
    """One line per (variant, keep): the best new option against the best single lambda."""
    best_new = min((n for n in NEW if n in summary["options"]), key=lambda n: summary["options"][n]["mean_kl"])
    o = summary["options"][best_new]
    ok = o["vs_best_single"] <= -TARGET_GAIN and o["worst_bucket_vs_best_single"] <= WORST_BUCKET
    return (f"best new option {best_new}: {_pct(o['vs_best_single'])} mean KL vs the best single lambda "
            f"({summary['best_single']}), worst bucket {_pct(o['worst_bucket_vs_best_single'])}: "
            + ("meets" if ok else "does not meet") + f" the bar (<= {_pct(-TARGET_GAIN)}, no bucket > "
            f"{_pct(WORST_BUCKET)})")


def headroom(src: dict, variant: str, keep: str) -> float:
    """How much any lambda schedule by prompt length could gain here: the mean over the buckets of
    each bucket's best single lambda, against the best single lambda over all buckets (<= 0)."""
    rows = [r for r in src["rows"] if r["variant"] == variant]
    singles = [n for n in src["summary"][f"{variant}@{keep}"]["options"] if n == "griffin" or n.startswith("lam=")]
    per_bucket = [min(r["results"][f"{n}@{keep}"]["kl"] for n in singles) for r in rows]
    best = src["summary"][f"{variant}@{keep}"]["options"][src["summary"][f"{variant}@{keep}"]["best_single"]]
    return (sum(per_bucket) / len(per_bucket)) / best["mean_kl"] - 1


def _keep_words(a: dict) -> str:
    """What "+keep" meant in these results: fits made before the joint-context refinement had none."""
    if any(src["fit"]["meta"].get("refine") for src in a["sources"].values()):
        return ("applied by the fitted share of the reallocation and refined with every layer sparse; "
                "+keep-unrefined: before that refinement; +keep-all: all of the reallocation, unrefined")
    return "applied by the fitted share of the reallocation; +keep-all: all of it"


def adaptive_markdown(a: dict, chat_template: bool = True) -> list[str]:
    L = [f"## Adaptive selection (held-out, {a['heldout_prompts']} prompts per bucket, {a['gen_tokens']}-token "
         "continuations)", "",
         "Fitted on the tune split only (`fit_selection`: "
         f"{a['tune_prompts']} tune prompts x {len(a['buckets'])} lengths); each bucket prepends that many tokens of "
         "other prompts. Options: griffin (lambda 0), lam=x (one lambda), length (lambda = tau / (tau + n), n "
         "= prompt tokens), layer (one tau per layer), +keep (per-layer keep from the fit, the same FFN bytes "
         f"per token, {_keep_words(a)}). Best single lambda = the lowest mean KL over the buckets among griffin "
         "and lam=x, "
         "chosen in hindsight on these held-out prompts (the strictest comparison). Variants: template = the "
         "chat template as shipped; no-system = an empty system turn instead of the template's default "
         "system prompt." + ("" if chat_template else " This model has no chat template: its prompts are the raw "
                              "text, so there is one variant (named template)."), ""]
    for source, src in a["sources"].items():
        fit, st = src["fit"], src["stats"]
        tau = float(fit["tau"])  # "inf" in JSON for the global-only end
        L += [f"### Statistics: {source} ({st.get('num_sequences')} x {st.get('seq_len')} tokens NPS, "
              f"{st.get('num_tokens')} tokens)", "",
              f"Fitted tau {tau:g} (lambda {_lam(tau, 40):.2f} at 40 prompt tokens, {_lam(tau, 300):.2f} at 300); "
              "per layer: " + ", ".join(f"{float(t):.0f}" for t in fit["layer_tau"]) + f". {_share_line(fit)}"
              f"Fit time {fit['meta'].get('seconds')} s.{_resumed_line(src)}", ""]
        for key, summ in src["summary"].items():
            variant, keep = key.split("@")
            rows = [r for r in src["rows"] if r["variant"] == variant]
            L += [f"**{variant}, keep {keep}**: KL by bucket (mean prompt tokens in the header)", "",
                  "| option | " + " | ".join(f"+{r['context_tokens']} ({r['prompt_tokens_mean']:.0f})" for r in rows)
                  + " | mean | vs best single | worst bucket vs best single | worst bucket vs GRIFFIN | FFN MB/token |",
                  "|---|" + "---|" * (len(rows) + 5)]
            for name, o in summ["options"].items():
                cells = [_f(r["results"][f"{name}@{keep}"]["kl"]) for r in rows]
                mb = src["bytes_per_token"].get(f"{name}@{keep}", 0) / 2 ** 20
                mark = " (best single)" if name == summ["best_single"] else ""
                L.append(f"| {name}{mark} | " + " | ".join(cells) + f" | {_f(o['mean_kl'])} | "
                         f"{_pct(o['vs_best_single'])} | {_pct(o['worst_bucket_vs_best_single'])} | "
                         f"{_pct(o['worst_bucket_vs_griffin'])} | {mb:.2f} |")
            L += ["", adaptive_verdict(summ) + f"; the best single lambda of each bucket would give "
                  f"{_pct(headroom(src, variant, keep))} (the most any lambda-by-length rule can gain here)", ""]
    return L


def _resumed_line(src: dict) -> str:
    """Where a stopped run's pieces were reused (evaluation/checkpoint.py), say so."""
    r = src.get("resumed")
    if not r:
        return ""
    return (f" Resumed: the fit and {r['rows']} of the scored rows below come from a stopped run of the same "
            f"code, inputs and machine ({src.get('seconds')} s of computing over all runs).")


def _share_line(fit: dict) -> str:
    """The fitted share of the per-layer keep reallocation and the tune KL behind it (fits made
    before the share existed applied all of it)."""
    by_share = fit["meta"].get("keep_shrink_kl")
    if not by_share:
        return "Per-layer keep: the whole reallocation (no share fitted). "
    line = (f"Per-layer keep: share {fit.get('keep_shrink', 1.0):g} of the reallocation (tune KL by share: "
            + ", ".join(f"{a} {v:.4f}" for a, v in by_share.items()) + "). ")
    refine = fit["meta"].get("refine")
    if refine:
        line += "Joint-context refinement: " + "; ".join(refine_summary(k, r) for k, r in refine.items()) + ". "
    return line


def plot_adaptive(a: dict, name: str, path: Path) -> Path:
    """KL against prompt length, one line per option; a panel per (statistics, variant, keep)."""
    import matplotlib.pyplot as plt

    from .report import _save

    panels = [(source, key) for source, src in a["sources"].items() for key in src["summary"]]
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4.2 * rows_n), squeeze=False)
    for ax, (source, key) in zip(axes.flat, panels):
        src = a["sources"][source]
        variant, keep = key.split("@")
        rows = [r for r in src["rows"] if r["variant"] == variant]
        x = [r["prompt_tokens_mean"] for r in rows]
        for opt in src["summary"][key]["options"]:
            y = [r["results"][f"{opt}@{keep}"]["kl"] for r in rows]
            new = opt in NEW
            ax.plot(x, y, marker="o" if new else ".", lw=2 if new else 1, linestyle="-" if new else "--", label=opt)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:.0f}" for v in x])
        ax.set_xlabel("prompt tokens (mean of the bucket)")
        ax.set_ylabel("KL(dense || sparse)")
        ax.set_title(f"{source}, {variant}, keep {keep}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{name}: KL against prompt length, held-out prompts")
    return _save(fig, path)
