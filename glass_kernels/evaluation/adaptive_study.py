"""The adaptive-selection study (``eval --parts adaptive``): λ by prompt length, per-layer λ and
per-layer keep (glass_kernels.adaptive) against every single λ, by prompt-length bucket.

Protocol, per model and statistics file:

1. ``fit_selection`` on the tune split (prompts at every length bucket, the template's default);
2. on the held-out split, per bucket (the prompt as is, then with +64 / +128 / +256 tokens of
   context prepended) and per chat-template variant (the template's default system prompt, and none,
   when the template has one), every configuration is scored on the same dense continuations:
   GRIFFIN (λ 0), single λ 0.25 ... 1, and the adaptive options, at each keep.

For speed, each batch runs its (dense) prompt once: a configuration's sets come from the reference
pass's prompt statistics through the patch's own selection (``Session.choose``) and only the
continuation is run per configuration (evaluation.run.continuation_logits). tests/test_adaptive.py
checks that this gives the sets and logits of running the prompt through the patched model.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from .checkpoint import StudyCheckpoint, code_id, stats_digest
from .metrics import TokenScores, kl_per_token, nll_per_token, top1_agree

__all__ = ["Option", "study_options", "run_study"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One scored selection rule (GlassConfig fields other than keep)."""

    name: str
    method: str = "a-glass"
    lam: float | str = 0.75
    keep_split: str = "uniform"
    keep_share: float | None = None  # share of the fitted reallocation (None: the fit's own)
    refined: bool = True  # False: without the fit's joint-context refinement of the split

    def config(self, keep: float):
        from ..patch import GlassConfig

        # the separate layout and no decode tuning: a cheap patch per scored batch (they choose how
        # the rows are stored and read, not which neurons are kept)
        return GlassConfig(method=self.method, keep=keep, lam=self.lam, keep_split=self.keep_split, tune=False,
                           layout="separate")

    @property
    def single_lam(self) -> bool:
        return self.keep_split == "uniform" and not isinstance(self.lam, str)

    def stats(self, fitted):
        """The statistics this option patches with: ``fitted``, or a copy whose fit applies
        ``keep_share`` of its per-layer reallocation and/or drops its refinement."""
        if self.keep_share is None and self.refined:
            return fitted
        fit = fitted.fit if self.refined else fitted.fit.unrefined()
        if self.keep_share is not None:
            fit = dataclasses.replace(fit, keep_shrink=self.keep_share)
        return fitted.with_fit(fit)


def study_options(lams=(0.25, 0.5, 0.75, 1.0)) -> list[Option]:
    out = [Option("griffin", "griffin", 0.0)]
    out += [Option(f"lam={x:g}", "a-glass", float(x)) for x in lams if x > 0]
    out += [Option("length", lam="length"), Option("layer", lam="layer"),
            Option("length+keep", lam="length", keep_split="fitted"),
            Option("layer+keep", lam="layer", keep_split="fitted"),
            # the fitted split before its joint-context refinement (what the refinement adds)
            Option("length+keep-unrefined", lam="length", keep_split="fitted", refined=False),
            # the loss curves' allocation in full, unrefined, as before the share was fitted
            Option("length+keep-all", lam="length", keep_split="fitted", keep_share=1.0, refined=False)]
    return out


def _checkpoint_key(fingerprint: str, source: str, stats, settings) -> dict:
    """Everything that decides a source's fit and scores (evaluation/checkpoint.py): the model, the
    statistics, the study's settings, the code, and where it runs (torch's CPU kernels and the C++
    core's ISA path may round differently; the thread count changes the order of sums)."""
    from ..machine import describe_machine

    # the commit: code_id says what matters of it; the platform string: a kernel update changes no result
    machine = {k: v for k, v in describe_machine().items() if k not in ("glass_kernels_commit", "platform")}
    study = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
             if f.name.startswith("adaptive_") or f.name == "batch_size"}
    return {"model_fingerprint": fingerprint, "source": source, "stats": stats_digest(stats), "settings": study,
            "code": code_id(), "machine": machine}


def _ffn_bytes(model, sites, gcfg, stats) -> int:
    """FFN weight bytes one decode step reads with this configuration (every layer's kept rows)."""
    from ..patch.selection import layer_k

    k = layer_k(gcfg, [s.D for s in sites], [s.handler.row_elems for s in sites], stats)
    elem = next(model.parameters()).element_size()
    return int(sum(kk * s.handler.row_elems * elem for kk, s in zip(k, sites)))


def run_study(model, tok, name: str, settings, stats_by_source: dict, *, gen, cache_file, fingerprint,
              progress_cls, log, checkpoint_root=None) -> dict:
    """The study's results dict (see the module docstring); ``gen(ids, n, desc)`` makes/caches the
    dense continuations, ``stats_by_source``: {"nps": GlobalStats, ...}. ``checkpoint_root``: a
    folder where each fit and scored row is kept as soon as it exists, and found again by a later
    run with the same model, statistics, settings, code and machine (evaluation/checkpoint.py);
    None: nothing kept."""
    from ..adaptive import fit_selection, json_float
    from ..ffn import find_ffn_sites
    from ..models import has_default_system_prompt
    from .data import load_prompts
    from .run import (_pad_id, continuation_logits, encode_prompts, length_prompts, make_batch, reference_pass,
                      spread)

    chat = getattr(tok, "chat_template", None) is not None
    sites = find_ffn_sites(model)
    variants = [("template", None)]
    if chat and has_default_system_prompt(tok):
        variants.append(("no-system", ""))
    pad = _pad_id(tok)
    tune_items, held_items = spread(load_prompts("tune"), settings.adaptive_tune), \
        spread(load_prompts("heldout"), settings.adaptive_heldout)
    tune_pool, held_pool = load_prompts("tune"), load_prompts("heldout")
    options = study_options(settings.adaptive_lams)
    out = {"buckets": list(settings.adaptive_targets), "keeps": list(settings.adaptive_keeps),
           "gen_tokens": settings.adaptive_gen_tokens, "variants": [v for v, _ in variants],
           "tune_prompts": len(tune_items), "heldout_prompts": len(held_items), "sources": {}}
    for source, stats in stats_by_source.items():
        t = time.perf_counter()
        ckpt = None if checkpoint_root is None else StudyCheckpoint(
            checkpoint_root, f"{name}-{source}", _checkpoint_key(fingerprint, source, stats, settings))
        fitted = None if ckpt is None else ckpt.load_fit(model)
        resumed = fitted is not None
        if not resumed:
            tune_ids = []
            for target in settings.adaptive_targets:
                tune_ids += encode_prompts(tok, length_prompts(tune_items, tune_pool, tok, chat, target), chat)
            fitted = fit_selection(model, tok, stats, prompts=tune_ids, gen_tokens=settings.adaptive_gen_tokens,
                                   batch_size=settings.batch_size, cache_file=cache_file, progress=settings.progress,
                                   log=log)
            if ckpt is not None:
                ckpt.save_fit(fitted)
                ckpt.add_seconds(time.perf_counter() - t)
        else:
            log(f"{name} {source}: the fit and {ckpt.resumed_rows} scored rows from {ckpt.path} (a stopped run's)")
        fit = fitted.fit
        rows = [s.handler.row_elems for s in sites]
        src = {"fit": {"tau": json_float(fit.tau), "layer_tau": [json_float(t) for t in fit.layer_tau], "meta": fit.meta,
                       "keep_shrink": fit.keep_shrink,
                       "layer_keep": {f"{k:g}": [kk / D for kk, D in zip(fit.layer_k(k, stats.D, rows), stats.D)]
                                      for k in settings.adaptive_keeps}},
               "stats": {k: stats.meta.get(k) for k in ("source", "num_sequences", "seq_len")}
               | {"num_tokens": stats.num_tokens}, "rows": []}
        keeps = settings.adaptive_keeps if source == "nps" else settings.adaptive_keeps[:1]
        vlist = variants if source == "nps" else variants[:1]
        src["bytes_per_token"] = {f"{o.name}@{k:g}": _ffn_bytes(model, sites, o.config(k), o.stats(fitted))
                                  for o in options for k in keeps}
        for vname, system in vlist:
            for target in settings.adaptive_targets:
                saved = None if ckpt is None else ckpt.row(vname, target)
                if saved is not None:
                    src["rows"].append(saved)
                    continue
                t_row = time.perf_counter()
                texts = length_prompts(held_items, held_pool, tok, chat, target)
                ids = encode_prompts(tok, texts, chat, system=system)
                conts = gen(ids, settings.adaptive_gen_tokens, f"adaptive-{source}-{vname}-{target}")
                scores = {f"{o.name}@{k:g}": TokenScores() for o in options for k in keeps}
                n_batches = math.ceil(len(ids) / settings.batch_size)
                bar = progress_cls(n_batches * (len(scores) + 1), f"{name} {source} {vname} +{target}")
                for s in range(0, len(ids), settings.batch_size):
                    batch = make_batch(ids[s:s + settings.batch_size], conts[s:s + settings.batch_size], pad)
                    ref = reference_pass(model, batch, keep_prompt_cache=True)
                    bar(1)
                    for o in options:
                        for k in keeps:
                            gcfg = o.config(k)
                            logits = continuation_logits(model, batch, ref, gcfg, o.stats(fitted))
                            _add(scores[f"{o.name}@{k:g}"], ref, logits, batch)
                            bar(1)
                    del ref
                bar.close()
                row = {"variant": vname, "context_tokens": target, "prompt_tokens_mean": sum(map(len, ids)) / len(ids),
                       "results": {key: sc.summary() for key, sc in scores.items()}}
                src["rows"].append(row)
                if ckpt is not None:
                    ckpt.add_row(row, time.perf_counter() - t_row)
                log(f"{name} {source} {vname} +{target}: " + ", ".join(
                    f"{key} {sc.kl:.3f}" for key, sc in scores.items()))
        # over every run that made the pieces, where a checkpoint kept them
        src["seconds"] = ckpt.seconds if ckpt is not None else round(time.perf_counter() - t, 1)
        if resumed:
            src["resumed"] = {"checkpoint": str(ckpt.path), "rows": ckpt.resumed_rows}
        src["summary"] = summarize(src, options, keeps)
        out["sources"][source] = src
    return out


def _add(scores: TokenScores, ref, logits, batch) -> None:
    B = logits.shape[0]
    kl = torch.stack([kl_per_token(ref.logits[b], logits[b]) for b in range(B)])
    nll = torch.stack([nll_per_token(logits[b], batch.targets[b]) for b in range(B)])
    agree = torch.stack([top1_agree(ref.logits[b], logits[b]) for b in range(B)])
    scores.add(kl, nll, agree, torch.ones_like(agree))


def summarize(src: dict, options, keeps) -> dict:
    """Per keep and variant: each option's KL averaged over the buckets, the best single λ (in
    hindsight, on these held-out prompts: the strictest comparison), and each option's change
    against it, overall and in its worst bucket."""
    out = {}
    variants = sorted({r["variant"] for r in src["rows"]})
    for v in variants:
        rows = [r for r in src["rows"] if r["variant"] == v]
        for k in keeps:
            keyed = {o.name: [r["results"][f"{o.name}@{k:g}"]["kl"] for r in rows] for o in options}
            mean = {n: sum(x) / len(x) for n, x in keyed.items()}
            singles = [o.name for o in options if o.single_lam]
            best_single = min(singles, key=lambda n: mean[n])
            per = {}
            for o in options:
                ratios = [a / b - 1 for a, b in zip(keyed[o.name], keyed[best_single])]
                vs_griffin = [a / b - 1 for a, b in zip(keyed[o.name], keyed["griffin"])]
                per[o.name] = {"mean_kl": mean[o.name], "vs_best_single": mean[o.name] / mean[best_single] - 1,
                               "worst_bucket_vs_best_single": max(ratios),
                               "worst_bucket_vs_griffin": max(vs_griffin)}
            out[f"{v}@{k:g}"] = {"best_single": best_single, "options": per}
    return out
