"""The evaluation driver (issue 5, docs/method.md "Evaluation").

Protocol, per model:

1. Each prompt (chat template for instruct models) is continued by the *dense* model, greedy,
   for exactly ``gen_tokens`` tokens (EOS suppressed with ``min_new_tokens``: the setting under
   test is short prompt / long generation, and a fixed length lets prompts be batched). The
   continuations are cached in JSON keyed by model fingerprint + prompt ids + length.
2. Per batch of prompts, one *reference* pass: the model patched with method "dense" reads the
   prompt (local statistics S_prompt), then the continuation inside ``session.prompt()`` (still
   dense, statistics keep accumulating). Its logits are the dense reference; S_total - S_prompt is
   the oracle statistic (the same activation statistic over the continuation tokens themselves).
3. Every method is then scored on the same batch, teacher-forced, exactly as a user would run it:
   ``patch(model, GlassConfig(method, keep, lam), stats)``, ``model(prompt)`` (dense, selects),
   ``model(continuation[:, :-1], cache=...)`` (sparse). The scored positions predict
   continuation tokens 2..N -- all of them produced by sparse forwards (token 1 comes from the
   dense prefill, identical for every method, so it is left out). The oracle method uses
   ``session.set_neurons`` with the top-k of the oracle statistic.

Scores: mean KL(p_dense || p_sparse) per token, perplexity of the continuation, top-1 agreement
with the dense argmax, and per layer the Jaccard overlap of each method's set with the oracle set.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..hf_compat import cache_kwargs, output_cache
from .metrics import TokenScores, jaccard_layers, kl_per_token, nll_per_token, top1_agree

logger = logging.getLogger(__name__)

__all__ = ["EvalSettings", "Config", "evaluate_model", "heldout_configs", "score_config",
           "dense_continuations", "encode_prompts", "oracle_sets"]

KEEPS = (0.5, 0.4, 0.3, 0.2)
SWEEP_LAMS = (0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)
LENGTH_LAMS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass
class EvalSettings:
    """Sizes of one evaluation run (the CLI fills it; ``quick()`` gives the --quick sizes)."""

    keeps: tuple = KEEPS
    gen_tokens: int = 256
    n_heldout: int | None = None  # None = every held-out prompt
    n_tune: int = 24  # tune prompts for the lambda sweep (spread over the kinds)
    sweep_lams: tuple = SWEEP_LAMS
    sweep_keeps: tuple = (0.5,)
    lam: float | None = None  # None: the best tune-split lambda of each variant (A / I) from the sweep
    n_length: int = 6  # tune prompts for the prompt-length study
    length_targets: tuple = (0, 64, 128, 256)  # tokens of context prepended
    length_lams: tuple = LENGTH_LAMS
    length_gen_tokens: int = 128
    batch_size: int = 6
    nps_sequences: int | None = None  # calibration sizes (None: calibrate()'s defaults)
    text_sequences: int = 64
    stats_seq_len: int = 256
    threads: int | None = None
    progress: bool = True
    parts: tuple = ("sweep", "heldout", "length", "adaptive")  # and "quant": the quantized-rows configurations
    # the adaptive-selection study (evaluation/adaptive_study.py)
    adaptive_tune: int = 36  # tune prompts (the fit), at each bucket
    adaptive_heldout: int = 36  # held-out prompts scored, at each bucket
    adaptive_targets: tuple = (0, 64, 128, 256)  # context tokens prepended: the prompt-length buckets
    adaptive_gen_tokens: int = 64
    adaptive_keeps: tuple = (0.5, 0.3)
    adaptive_lams: tuple = (0.25, 0.5, 0.75, 1.0)  # the single lambdas compared (and GRIFFIN, lambda 0)
    adaptive_small_stats: tuple | None = (32, 128)  # also fit and score on weaker NPS stats (seqs, len)

    @classmethod
    def quick(cls) -> "EvalSettings":
        return cls(keeps=(0.5,), gen_tokens=64, n_heldout=6, n_tune=6, sweep_lams=(0.0, 0.5, 0.75, 1.0),
                   n_length=3, length_targets=(0, 96), length_lams=(0.0, 0.75, 1.0), length_gen_tokens=48,
                   batch_size=6, nps_sequences=16, text_sequences=16, stats_seq_len=128,
                   adaptive_tune=3, adaptive_heldout=3, adaptive_targets=(0, 96), adaptive_gen_tokens=24,
                   adaptive_keeps=(0.5,), adaptive_small_stats=None)


@dataclasses.dataclass(frozen=True)
class Config:
    """One scored configuration: method ("oracle" = the continuation's own top-k), keep, lambda, stats."""

    method: str
    keep: float
    lam: float | None = None
    stats: str | None = None  # "nps" | "text" | None
    weights: str | None = None  # GlassConfig.weights: "int8" | "int4" | None (the model's floats)

    @property
    def name(self) -> str:
        s = self.method
        if self.method in ("a-glass", "i-glass"):
            s += f" lam={self.lam:g}"
        if self.stats and self.stats != "nps":
            s += f" ({self.stats})"
        if self.weights:
            s += f" [{self.weights}]"
        return s

    @property
    def key(self) -> str:
        return f"{self.name}@{self.keep:g}"


def heldout_configs(keeps: Sequence[float], lam_a: float, lam_i: float) -> list[Config]:
    out = []
    for keep in keeps:
        out += [Config("random", keep), Config("global", keep, stats="nps"), Config("griffin", keep),
                Config("a-glass", keep, lam_a, "nps"), Config("i-glass", keep, lam_i, "nps"),
                Config("a-glass", keep, lam_a, "text"), Config("oracle", keep)]
    return out


# --------------------------------------------------------------------------------------------------
# prompts and continuations
# --------------------------------------------------------------------------------------------------

def encode_prompts(tok, texts: Sequence[str], chat: bool, system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt (``system``: see models.prompt_ids; "" = no system prompt)."""
    from ..models import prompt_ids

    return [prompt_ids(tok, t, chat, system=system) for t in texts]


def _pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids, mask


def _pad_id(tok) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tok, name, None)
        if isinstance(v, int):
            return v
    return 0


def _cont_key(fingerprint: str, ids: Sequence[int], n: int) -> str:
    h = hashlib.sha256(f"{fingerprint}|{n}|{','.join(map(str, ids))}".encode()).hexdigest()
    return h[:32]


def dense_continuations(model, tok, prompt_ids: Sequence[Sequence[int]], n_tokens: int, *,
                        cache_file: Path | None, fingerprint: str, batch_size: int,
                        progress: Callable | None = None) -> list[list[int]]:
    """Greedy continuations of exactly ``n_tokens`` tokens by the (unpatched) dense model, cached."""
    cache: dict = {}
    if cache_file is not None and cache_file.exists():
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    keys = [_cont_key(fingerprint, p, n_tokens) for p in prompt_ids]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    pad = _pad_id(tok)
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        ids, mask = _pad_left([prompt_ids[i] for i in chunk], pad)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens,
                                 min_new_tokens=n_tokens, do_sample=False, top_k=None, top_p=None,
                                 temperature=None, pad_token_id=pad)
        gen = out[:, ids.shape[1]:]
        if gen.shape[1] != n_tokens:
            raise RuntimeError(f"generate() returned {gen.shape[1]} tokens, expected {n_tokens}")
        for j, i in enumerate(chunk):
            cache[keys[i]] = gen[j].tolist()
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(cache, f)
            os.replace(tmp, cache_file)
        if progress is not None:
            progress(len(chunk))
    return [cache[k] for k in keys]


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Batch:
    ids: torch.Tensor  # [B, Tp] left padded prompt
    mask: torch.Tensor  # [B, Tp]
    pos: torch.Tensor  # [B, Tp] position ids (as generate() computes them)
    cont_in: torch.Tensor  # [B, N-1] continuation tokens fed teacher-forced
    cont_mask: torch.Tensor  # [B, Tp + N-1] attention mask for the continuation forward
    cont_pos: torch.Tensor  # [B, N-1]
    targets: torch.Tensor  # [B, N-1] = continuation tokens 2..N


def make_batch(prompt_ids: Sequence[Sequence[int]], conts: Sequence[Sequence[int]], pad_id: int) -> _Batch:
    ids, mask = _pad_left(prompt_ids, pad_id)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    c = torch.tensor([list(x) for x in conts], dtype=torch.long)
    if c.shape[1] < 2:
        raise ValueError("continuations need at least 2 tokens to be scored")
    cont_in, targets = c[:, :-1], c[:, 1:]
    n = cont_in.shape[1]
    cont_mask = torch.cat([mask, torch.ones(mask.shape[0], n, dtype=mask.dtype)], 1)
    cont_pos = pos[:, -1:] + 1 + torch.arange(n)
    return _Batch(ids, mask, pos, cont_in, cont_mask, cont_pos, targets)


def _forward_pair(model, batch: _Batch, between: Callable[[], None] | None = None):
    """Prompt forward, optional hook (select / force sets), continuation forward -> its logits."""
    out = model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.pos, use_cache=True)
    if between is not None:
        between()
    out2 = model(input_ids=batch.cont_in, attention_mask=batch.cont_mask, position_ids=batch.cont_pos,
                 **cache_kwargs(model, output_cache(out)), use_cache=True)
    return out2.logits


def oracle_sets(oracle_stat: Sequence[torch.Tensor], k: Sequence[int]) -> list[torch.Tensor]:
    """Per layer the top-k neurons of the oracle statistic, [B, k] sorted ascending (ties: lower index)."""
    from .. import ops

    out = []
    for s, kk in zip(oracle_stat, k):
        D = s.shape[-1]
        ident = torch.arange(1, D + 1, dtype=torch.int32)
        out.append(ops.select_neurons(s.float().contiguous(), ident, 0.0, kk))
    return out


@dataclasses.dataclass
class Reference:
    logits: torch.Tensor  # [B, N-1, V] dense logits at the scored positions
    oracle_stat: list  # per layer fp32 [B, D]
    prompt_stat: list  # per layer fp32 [B, D]
    nll: torch.Tensor  # [B, N-1]
    prompt_cache: object = None  # the (dense) prompt's KV cache, before the continuation


def reference_pass(model, batch: _Batch, keep_prompt_cache: bool = False) -> Reference:
    """The dense pass of a batch (``keep_prompt_cache``: also a copy of the prompt's KV cache, which
    continuation_logits reuses so that each configuration only runs the continuation)."""
    import glass_kernels as gk

    gk.patch(model, gk.GlassConfig(method="dense", layout="separate", tune=False))  # no relayout copy per batch
    try:
        sess = gk.session(model)
        with torch.inference_mode():
            out = model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.pos, use_cache=True)
            prompt_stat = sess.local_stats()
            prompt_cache = copy.deepcopy(output_cache(out)) if keep_prompt_cache else None
            with sess.prompt():
                out2 = model(input_ids=batch.cont_in, attention_mask=batch.cont_mask, position_ids=batch.cont_pos,
                             **cache_kwargs(model, output_cache(out)), use_cache=True)
            total = sess.local_stats()
    finally:
        gk.unpatch(model)
    # Sums of squares over tokens, so the continuation's share is the difference (>= 0 up to rounding).
    oracle = [(t - p).clamp_min_(0.0) for t, p in zip(total, prompt_stat)]
    logits = out2.logits
    nll = torch.stack([nll_per_token(logits[b], batch.targets[b]) for b in range(logits.shape[0])])
    return Reference(logits, oracle, prompt_stat, nll, prompt_cache)


def score_config(model, cfg: Config, batch: _Batch, ref: Reference, stats: dict, scores: TokenScores,
                 want_sets: bool = False):
    """Score one configuration on one batch into ``scores``; returns the chosen sets if asked."""
    import glass_kernels as gk

    from ..patch.quantized import FloatWeights

    gcfg = gk.GlassConfig(method="griffin" if cfg.method == "oracle" else cfg.method, keep=cfg.keep,
                          lam=cfg.lam if cfg.lam is not None else gk.GlassConfig().lam, weights=cfg.weights)
    # quantized weights: unpatch leaves the dequantized values, so the float originals are kept here
    # and put back afterwards (every configuration is scored against the same float model)
    originals = FloatWeights(model) if cfg.weights else None
    gk.patch(model, gcfg, stats=stats.get(cfg.stats) if cfg.stats else None)
    try:
        sess = gk.session(model)
        chosen = []

        def between():
            if cfg.method == "oracle":
                sess.set_neurons(oracle_sets(ref.oracle_stat, sess.k))
            if want_sets:
                chosen.extend(sess.neurons())

        with torch.inference_mode():
            logits = _forward_pair(model, batch, between)
    finally:
        gk.unpatch(model)
        if originals is not None:
            originals.put_back()
    B = logits.shape[0]
    kl = torch.stack([kl_per_token(ref.logits[b], logits[b]) for b in range(B)])
    nll = torch.stack([nll_per_token(logits[b], batch.targets[b]) for b in range(B)])
    agree = torch.stack([top1_agree(ref.logits[b], logits[b]) for b in range(B)])
    scores.add(kl, nll, agree, torch.ones_like(agree))
    return chosen if want_sets else None


def continuation_logits(model, batch: _Batch, ref: Reference, gcfg, stats, sets=None, return_sets: bool = False):
    """Logits of the continuation under ``patch(model, gcfg, stats)``, reusing the reference's prompt
    cache: the prompt forward is dense for every method, so only the continuation differs. The sets
    are ``sets`` (per layer [B or 1, k_l]) or, if None, the ones the patch itself chooses from the
    reference's prompt statistics and token counts (Session.choose). tests/test_adaptive.py checks
    this gives the sets and logits of running the prompt through the patched model."""
    import glass_kernels as gk

    if ref.prompt_cache is None:
        raise ValueError("the reference pass kept no prompt cache (reference_pass(keep_prompt_cache=True))")
    gk.patch(model, gcfg, stats=stats)
    try:
        sess = gk.session(model)
        if sets is None:
            sets = sess.choose(ref.prompt_stat, batch.mask.sum(1))
        sess.set_neurons(sets)
        with torch.inference_mode():
            out = model(input_ids=batch.cont_in, attention_mask=batch.cont_mask, position_ids=batch.cont_pos,
                        **cache_kwargs(model, copy.deepcopy(ref.prompt_cache)), use_cache=True)
    finally:
        gk.unpatch(model)
    return (out.logits, sets) if return_sets else out.logits


def quant_configs(lam: float) -> list[Config]:
    """The quality cost of quantized rows: dense and A-GLASS keep 0.5, in the model's floats, int8, int4."""
    return [Config("dense", 1.0, weights="int8"), Config("dense", 1.0, weights="int4"),
            Config("a-glass", 0.5, lam, "nps"), Config("a-glass", 0.5, lam, "nps", weights="int8"),
            Config("a-glass", 0.5, lam, "nps", weights="int4")]


def dense_scores(ref: Reference, batch: _Batch, scores: TokenScores) -> None:
    z = torch.zeros_like(ref.nll)
    scores.add(z, ref.nll, torch.ones_like(z, dtype=torch.bool), torch.ones_like(z, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------------

def spread(items: list[dict], n: int | None) -> list[dict]:
    """n items taken round-robin over the kinds (so a subset still covers every kind)."""
    if n is None or n >= len(items):
        return list(items)
    by_kind: dict[str, list] = {}
    for it in items:
        by_kind.setdefault(it["kind"], []).append(it)
    out, i = [], 0
    while len(out) < n:
        for kind in by_kind:
            if i < len(by_kind[kind]) and len(out) < n:
                out.append(by_kind[kind][i])
        i += 1
    return out


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def __call__(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _get_stats(model, tok, name: str, settings: EvalSettings, progress: bool) -> dict:
    """NPS stats (shared with the CLI's cache) and text stats (pydoc topics), calibrated once."""
    return {"nps": _cached_stats(model, tok, name, "nps", settings.nps_sequences, settings.stats_seq_len, progress),
            "text": _cached_stats(model, tok, name, "text", settings.text_sequences, settings.stats_seq_len,
                                  progress)}


def _small_stats(model, tok, name: str, settings: EvalSettings):
    """NPS statistics of the size a quick user calibration makes (settings.adaptive_small_stats)."""
    n, seq_len = settings.adaptive_small_stats
    return _cached_stats(model, tok, name, "nps", n, seq_len, settings.progress)


def _cached_stats(model, tok, name: str, source: str, n: int | None, seq_len: int, progress: bool):
    """``source`` ("nps" or "text": the pydoc topics) statistics of n x seq_len tokens, from the CLI's
    cache, else calibrated once and cached."""
    from ..calibrate import calibrate
    from ..cli import stats_cache_path
    from ..stats import GlobalStats
    from .data import text_corpus

    path = stats_cache_path(model, name, "nps" if source == "nps" else "pydoc", n, seq_len)
    if path.exists():
        return GlobalStats.load(path, model=model)
    t0 = time.perf_counter()
    stats = calibrate(model, tok, "nps" if source == "nps" else text_corpus(), num_sequences=n, seq_len=seq_len,
                      progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    logger.info("calibrated %s stats for %s in %.1f s -> %s", source, name, time.perf_counter() - t0, path)
    return stats


def _run_configs(model, prompt_ids, conts, configs: list[Config], stats, settings, pad, bar,
                 jaccard_keeps=()) -> tuple[dict, dict]:
    """Score configs on all prompts, batch by batch (one reference pass per batch)."""
    scores = {c.key: TokenScores() for c in configs}
    scores["dense"] = TokenScores()
    jac: dict = {}  # keep -> variant -> per layer list of per-sequence values
    for s in range(0, len(prompt_ids), settings.batch_size):
        batch = make_batch(prompt_ids[s:s + settings.batch_size], conts[s:s + settings.batch_size], pad)
        ref = reference_pass(model, batch)
        dense_scores(ref, batch, scores["dense"])
        bar(1)
        for cfg in configs:
            want = cfg.keep in jaccard_keeps and cfg.method in ("global", "griffin", "a-glass", "i-glass") \
                and cfg.stats in (None, "nps")
            sets = score_config(model, cfg, batch, ref, stats, scores[cfg.key], want_sets=want)
            if want:
                k = [int(t.shape[-1]) for t in sets]
                orc = oracle_sets(ref.oracle_stat, k)
                variant = {"global": "global", "griffin": "local", "a-glass": "aggregated (A)",
                           "i-glass": "aggregated (I)"}[cfg.method]
                per = jaccard_layers(sets, orc)
                d = jac.setdefault(cfg.keep, {}).setdefault(variant, [[] for _ in per])
                for l, vals in enumerate(per):
                    d[l].extend(vals)
            bar(1)
        del ref
    return scores, jac


def _summaries(scores: dict, configs: list[Config]) -> dict:
    out = {"dense": dict(scores["dense"].summary(), method="dense", keep=1.0, lam=None, stats=None)}
    for c in configs:
        out[c.key] = dict(scores[c.key].summary(), method=c.method, keep=c.keep, lam=c.lam, stats=c.stats,
                          name=c.name)
    return out


def length_prompts(items: list[dict], pool: list[dict], tok, chat: bool, target: int) -> list[str]:
    """Each prompt with about ``target`` tokens of context prepended: other prompts of the same kind
    (then any kind), joined by blank lines -- a longer prompt on a related topic mix."""
    texts = []
    for it in items:
        if target == 0:
            texts.append(it["text"])
            continue
        same = [p for p in pool if p["kind"] == it["kind"] and p["id"] != it["id"]]
        other = [p for p in pool if p["kind"] != it["kind"]]
        ctx, n = [], 0
        for p in same + other:
            if n >= target:
                break
            ctx.append(p["text"])
            n += len(tok(p["text"] + "\n\n")["input_ids"])
        texts.append("\n\n".join(ctx) + "\n\n" + it["text"])
    return texts


def evaluate_model(name: str, settings: EvalSettings, *, loader=None, out_dir: Path | None = None,
                   cache_file: Path | None = None, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run the evaluation of one model; returns the results dict (also written by the CLI).

    ``checkpoint(res)`` is called after each part with the results so far (partial reports).
    """
    from ..models import load_model
    from ..stats import model_signature
    from .data import load_prompts

    t_start = time.perf_counter()
    if settings.threads:
        # The C++ core follows torch.get_num_threads() (glass_kernels._ext.sync_threads).
        torch.set_num_threads(settings.threads)
    model, tok = (loader or load_model)(name, torch.float32)
    model.eval()
    chat = getattr(tok, "chat_template", None) is not None
    pad = _pad_id(tok)
    fingerprint = model_signature(model)["fingerprint"]
    if cache_file is None:
        from ..models import cache_dir

        cache_file = cache_dir() / "eval" / f"continuations-{fingerprint[:16]}.json"
    timing: dict = {}
    t0 = time.perf_counter()
    stats = _get_stats(model, tok, name, settings, settings.progress)
    timing["stats_s"] = round(time.perf_counter() - t0, 1)

    tune = spread(load_prompts("tune"), settings.n_tune)
    held = spread(load_prompts("heldout"), settings.n_heldout)
    res: dict = {"model": name, "chat_template": chat, "fingerprint": fingerprint,
                 "settings": dataclasses.asdict(settings), "machine": machine_info(),
                 "stats": {k: {kk: v.meta.get(kk) for kk in ("source", "num_sequences", "seq_len", "seed", "text")}
                           | {"num_tokens": v.num_tokens} for k, v in stats.items()}}
    res["stats"]["text"]["text"] = "pydoc_data.topics (CPython's bundled documentation)"

    def gen(items_ids, n, desc):
        t = time.perf_counter()
        bar = _Progress(len(items_ids), f"{name}: dense continuations ({desc})", settings.progress)
        c = dense_continuations(model, tok, items_ids, n, cache_file=cache_file, fingerprint=fingerprint,
                                batch_size=settings.batch_size, progress=bar)
        bar.close()
        timing[f"generate_{desc}_s"] = round(time.perf_counter() - t, 1)
        return c

    n_batches = lambda n: math.ceil(n / settings.batch_size)  # noqa: E731
    lam_a = lam_i = settings.lam
    # ---- lambda sweep on the tune split -----------------------------------------------------------
    if "sweep" in settings.parts:
        ids = encode_prompts(tok, [p["text"] for p in tune], chat)
        conts = gen(ids, settings.gen_tokens, "tune")
        configs = [Config(m, keep, lam, "nps") for keep in settings.sweep_keeps for m in ("a-glass", "i-glass")
                   for lam in settings.sweep_lams]
        bar = _Progress(n_batches(len(ids)) * (len(configs) + 1), f"{name}: lambda sweep (tune)", settings.progress)
        t = time.perf_counter()
        scores, _ = _run_configs(model, ids, conts, configs, stats, settings, pad, bar)
        bar.close()
        timing["sweep_s"] = round(time.perf_counter() - t, 1)
        sweep = {"prompts": [p["id"] for p in tune], "results": _summaries(scores, configs)}
        best = {}
        for m in ("a-glass", "i-glass"):
            k0 = settings.sweep_keeps[0]
            cands = [c for c in configs if c.method == m and c.keep == k0]
            b = min(cands, key=lambda c: scores[c.key].kl)
            best[m] = b.lam
        sweep["best_lam"] = best
        res["lambda_sweep"] = sweep
        if settings.lam is None:
            lam_a, lam_i = best["a-glass"], best["i-glass"]
        if checkpoint:
            checkpoint(dict(res, timing=dict(timing), partial=True))
    if lam_a is None:
        from ..patch.config import DEFAULT_LAMBDA

        lam_a = lam_i = DEFAULT_LAMBDA
    res["lam_used"] = {"a-glass": lam_a, "i-glass": lam_i,
                       "chosen_by": "tune-split sweep" if settings.lam is None and "sweep" in settings.parts
                       else "given"}
    # ---- held-out: every method and keep -------------------------------------------------------------
    if "heldout" in settings.parts:
        ids = encode_prompts(tok, [p["text"] for p in held], chat)
        conts = gen(ids, settings.gen_tokens, "heldout")
        configs = heldout_configs(settings.keeps, lam_a, lam_i)
        bar = _Progress(n_batches(len(ids)) * (len(configs) + 1), f"{name}: held-out", settings.progress)
        t = time.perf_counter()
        scores, jac = _run_configs(model, ids, conts, configs, stats, settings, pad, bar,
                                   jaccard_keeps=settings.keeps)
        bar.close()
        timing["heldout_s"] = round(time.perf_counter() - t, 1)
        res["heldout"] = {
            "prompts": [p["id"] for p in held],
            "prompt_tokens_mean": sum(map(len, ids)) / len(ids),
            "results": _summaries(scores, configs),
            "jaccard": {str(keep): {v: [sum(x) / len(x) for x in layers] for v, layers in d.items()}
                        for keep, d in jac.items()},
        }
        if checkpoint:
            checkpoint(dict(res, timing=dict(timing), partial=True))
    # ---- quantized rows (held-out split): dense and A-GLASS in the float, int8 and int4 weights ------
    if "quant" in settings.parts:
        ids = encode_prompts(tok, [p["text"] for p in held], chat)
        conts = gen(ids, settings.gen_tokens, "heldout")
        configs = quant_configs(lam_a if lam_a is not None else gk_default_lam())
        bar = _Progress(n_batches(len(ids)) * (len(configs) + 1), f"{name}: quantized rows", settings.progress)
        t = time.perf_counter()
        scores, _ = _run_configs(model, ids, conts, configs, stats, settings, pad, bar)
        bar.close()
        timing["quant_s"] = round(time.perf_counter() - t, 1)
        res["quant"] = {"prompts": [p["id"] for p in held], "results": _summaries(scores, configs),
                        "note": "KL against the float dense model; int8 / int4 = ggml Q8_0 / Q4_0 rows"}
        for c in configs:
            res["quant"]["results"][c.key]["weights"] = c.weights or "float"
        if checkpoint:
            checkpoint(dict(res, timing=dict(timing), partial=True))
    # ---- adaptive selection: lambda by length / layer, per-layer keep (held-out, by length bucket) -----
    if "adaptive" in settings.parts:
        from .adaptive_study import run_study

        t = time.perf_counter()
        by_source = {"nps": stats["nps"]}
        if settings.adaptive_small_stats:
            by_source["nps-small"] = _small_stats(model, tok, name, settings)
        res["adaptive"] = run_study(
            model, tok, name, settings, by_source, gen=gen, cache_file=cache_file, fingerprint=fingerprint,
            progress_cls=lambda total, desc: _Progress(total, desc, settings.progress), log=logger.info,
            checkpoint_root=cache_file.parent / "adaptive")  # a stopped study goes on from its last piece
        timing["adaptive_s"] = round(time.perf_counter() - t, 1)
        if checkpoint:
            checkpoint(dict(res, timing=dict(timing), partial=True))
    # ---- prompt-length dependence (tune split) --------------------------------------------------------
    if "length" in settings.parts:
        items = spread(load_prompts("tune"), settings.n_length)
        pool = load_prompts("tune")
        rows = []
        t = time.perf_counter()
        for target in settings.length_targets:
            texts = length_prompts(items, pool, tok, chat, target)
            ids = encode_prompts(tok, texts, chat)
            conts = gen(ids, settings.length_gen_tokens, f"length{target}")
            configs = [Config("a-glass", 0.5, lam, "nps") for lam in settings.length_lams]
            bar = _Progress(n_batches(len(ids)) * (len(configs) + 1), f"{name}: prompt length +{target}",
                            settings.progress)
            scores, _ = _run_configs(model, ids, conts, configs, stats, settings, pad, bar)
            bar.close()
            summ = _summaries(scores, configs)
            by_lam = {f"{c.lam:g}": summ[c.key] for c in configs}
            best = min(configs, key=lambda c: scores[c.key].kl)
            rows.append({"context_tokens": target, "prompt_tokens_mean": sum(map(len, ids)) / len(ids),
                         "by_lam": by_lam, "best_lam": best.lam, "dense": summ["dense"]})
        timing["length_s"] = round(time.perf_counter() - t, 1)
        res["prompt_length"] = {"prompts": [p["id"] for p in items], "keep": 0.5,
                                "gen_tokens": settings.length_gen_tokens, "rows": rows}
    timing["total_s"] = round(time.perf_counter() - t_start, 1)
    res["timing"] = timing
    del model
    return res


def gk_default_lam() -> float:
    from ..patch import GlassConfig

    return GlassConfig().lam


def machine_info() -> dict:
    from ..machine import describe_machine

    return describe_machine()
