"""The quality of the vLLM plugin's selection choices, on a real model: shared batch sets and the
tensor-parallel rule.

Run in the main venv (transformers; no vLLM needed: each rule is applied through the patch):

    .venv/bin/python benchmarks/vllm_selection_quality.py [--model smollm2] [--batches 4,16]
        [--keeps 0.5,0.3] [--tp 2,4] [--tokens 64] [--out reports/vllm]

Held-out chat prompts in groups of B decode together. Per group: the dense model's greedy
continuation of each prompt, then the KL of the patched model's next-token distributions from the
dense ones along it (teacher-forced), with A-GLASS sets chosen by each rule:

* per-request: each request's own set (the plugin's default, = glass_kernels.patch; also what
  every tensor-parallel rank keeps between them, since the plugin gathers the statistics);
* shared: one set per layer for the whole group, from the pooled prompt statistics exactly as the
  plugin pools them (each request's statistic divided by its prompt tokens, summed);
* per-shard tp N: the alternative tensor-parallel rule, k / N neurons chosen on each of N
  contiguous shards from the shard's own statistics and the global ranks re-ranked within it (no
  communication, equal work per rank).

Writes <out>/selection_quality_<model>.json and .md (mean KL +- s.e. over prompts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def pooled_sets(sess, prompt_stat, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The plugin's shared set per layer ([1, k]) for a group: its pooled statistic, selected with the
    group's total prompt tokens (what ServingState._shared_set computes)."""
    from glass_kernels.vllm_plugin.state import pool_statistics

    n = tokens.tolist()
    pooled = [pool_statistics([s[b:b + 1] for b in range(len(n))], n) for s in prompt_stat]
    return sess.choose(pooled, tokens.sum().reshape(1))


def per_shard_sets(prompt_stat, global_ranks, k, lam: float, tp: int) -> list[torch.Tensor]:
    """Per layer [B, k]: k / tp neurons from each of tp contiguous shards, chosen from the shard's
    own statistics and the global ranks re-ranked within the shard."""
    from glass_kernels import ops
    from glass_kernels.vllm_plugin.state import shard_ranks

    out = []
    for stat, ranks, kk in zip(prompt_stat, global_ranks, k):
        D = stat.shape[-1]
        if D % tp or kk % tp:
            raise ValueError(f"D = {D} and k = {kk} must divide by tp = {tp}")
        parts = []
        for j in range(tp):
            lo, hi = j * D // tp, (j + 1) * D // tp
            parts.append(ops.select_neurons(stat[:, lo:hi].float().contiguous(), shard_ranks(ranks, lo, hi), lam,
                                            kk // tp) + lo)
        out.append(torch.cat(parts, 1).to(torch.int32))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batches", default="4,16")
    p.add_argument("--keeps", default="0.5,0.3")
    p.add_argument("--tp", default="2,4", help="tensor-parallel sizes of the per-shard rule")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--out", default="reports/vllm")
    args = p.parse_args(argv)

    import glass_kernels as gk
    from glass_kernels.cli import _cached_or_calibrated_stats
    from glass_kernels.evaluation.data import load_prompts
    from glass_kernels.evaluation.metrics import kl_per_token
    from glass_kernels.evaluation.run import (_pad_id, continuation_logits, dense_continuations, make_batch,
                                              reference_pass)
    from glass_kernels.machine import cpu_name
    from glass_kernels.models import cache_dir, load_model, prompt_ids
    from glass_kernels.stats import model_signature

    t0 = time.time()
    model, tok = load_model(args.model)
    stats, _ = _cached_or_calibrated_stats(model, tok, args.model, out=sys.stderr)
    texts = [q["text"] for q in load_prompts("heldout")][:args.prompts]
    ids = [prompt_ids(tok, t, chat=True) for t in texts]
    fp = model_signature(model)["fingerprint"]
    conts = dense_continuations(model, tok, ids, args.tokens, fingerprint=fp, batch_size=8,
                                cache_file=cache_dir() / "eval" / f"continuations-{fp[:16]}.json")
    pad = _pad_id(tok)
    kl = {}  # (keep, B, mode) -> per-prompt mean KL
    batches = [int(b) for b in args.batches.split(",")]
    tps = [int(t) for t in args.tp.split(",")] if args.tp else []
    for B in batches:
        for start in range(0, len(ids) - B + 1, B):
            batch = make_batch(ids[start:start + B], conts[start:start + B], pad)
            ref = reference_pass(model, batch, keep_prompt_cache=True)
            tokens = batch.mask.sum(1)
            for keep in [float(k) for k in args.keeps.split(",")]:
                gcfg = gk.GlassConfig(method="a-glass", keep=keep, tune=False, layout="separate")
                own = continuation_logits(model, batch, ref, gcfg, stats)
                gk.patch(model, gcfg, stats=stats)
                try:
                    sess = gk.session(model)
                    shared_sets = pooled_sets(sess, ref.prompt_stat, tokens)
                    k = sess.k
                finally:
                    gk.unpatch(model)
                modes = [("per-request", own),
                         ("shared", continuation_logits(model, batch, ref, gcfg, stats, sets=shared_sets))]
                if B == batches[0]:  # the per-shard rule does not depend on the batch: score it once
                    ranks = [r.to(torch.int32) for r in stats.ranks("activation")]
                    for tp in tps:
                        sets = per_shard_sets(ref.prompt_stat, ranks, k, gcfg.lam, tp)
                        modes.append((f"per-shard tp {tp}",
                                      continuation_logits(model, batch, ref, gcfg, stats, sets=sets)))
                for mode, logits in modes:
                    per_prompt = [float(kl_per_token(ref.logits[b], logits[b]).mean()) for b in range(B)]
                    kl.setdefault((keep, B, mode), []).extend(per_prompt)
            print(f"B={B} group {start // B + 1} ({time.time() - t0:.0f} s)", file=sys.stderr)

    rows = []
    for (keep, B, mode), vals in sorted(kl.items()):
        se = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else float("nan")
        rows.append({"keep": keep, "batch": B, "mode": mode, "kl_mean": statistics.mean(vals), "kl_se": se,
                     "prompts": len(vals)})
    meta = {"model": f"{args.model} (4-bit GGUF dequantized to fp32)", "cpu": cpu_name(), "tokens": args.tokens,
            "method": "a-glass", "lam": gk.GlassConfig().lam, "elapsed_s": round(time.time() - t0)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"selection_quality_{args.model}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Selection rules of the vLLM plugin, {args.model}", "", ", ".join(f"{k}: {v}" for k, v in meta.items()),
             "", "| keep | rule | batch | KL (mean +- s.e.) | vs per-request |", "|---|---|---|---|---|"]
    by = {(r["keep"], r["batch"], r["mode"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (-r["keep"], r["mode"] != "per-request", r["mode"], r["batch"])):
        if r["mode"] != "shared" and r["batch"] != batches[0]:
            continue  # the same sets at every batch size
        base = by[(r["keep"], r["batch"], "per-request")]
        lines.append(f"| {r['keep']:g} | {r['mode']} | {r['batch'] if r['mode'] == 'shared' else '-'} | "
                     f"{r['kl_mean']:.3f} +- {r['kl_se']:.3f} | {r['kl_mean'] / base['kl_mean']:.2f}x |")
    lines += ["", f"Mean over {rows[0]['prompts']} held-out chat prompts of the per-token KL(dense || patched) along "
              "the dense model's greedy continuation; +- one standard error over prompts. per-request and per-shard "
              "rows do not depend on the batch (shown once)."]
    (out / f"selection_quality_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
