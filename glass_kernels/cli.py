"""``python -m glass_kernels``: demo | generate | calibrate | tune | eval | bench.

* ``demo`` (the README's main job): loads SmolLM2-135M-Instruct (offline, from its PyPI wheel),
  calibrates its global statistics once (cached next to the model cache, keyed by the model's FFN
  fingerprint), shows the dense and the GLASS continuations of a few prompts side by side, and measures
  in the same run the decode speed of the dense model and of the patched model at several keep
  fractions, with the agreement of each with the dense tokens.
* ``generate``: prompt -> text, dense or patched.
* ``calibrate``: model -> GlobalStats .safetensors file.
* ``tune``: measure the decode kernel's per-machine setting (ISA, neurons in flight, prefetch) on a
  model and cache it (``patch`` does this on its own the first time; this re-measures).
* ``eval`` / ``bench``: the evaluation suite's drivers (``glass_kernels.evaluation.cli``).

Timing method (demo): greedy decoding through ``model.generate`` with ``min_new_tokens =
max_new_tokens`` (every run decodes the same number of tokens), a streamer timestamps the first new
token (the end of the prefill) and the end; decode tokens/s = (new tokens - 1) / (end - first token),
so the prefill is excluded.  A warm-up run of each configuration first, then rounds over the prompts
in which the dense model and every keep fraction run in turn (rotating order); medians are reported.
Agreement = teacher-forced top-1 agreement: the patched model reads the prompt (dense prefill, which
fixes its neurons), then the dense model's greedy continuation in one forward; the fraction of
positions where its argmax equals the dense token (the first new token comes from the dense prefill in
both, so it is not counted).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import torch

from .hf_compat import cache_kwargs, output_cache
from .machine import describe_machine

__all__ = ["main", "build_parser", "stats_cache_path", "DEFAULT_PROMPTS"]

logger = logging.getLogger("glass_kernels.cli")

DEFAULT_PROMPTS = (
    "Explain why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "Give me three tips for learning a new language.",
)
DEMO_KEEPS = (0.8, 0.7, 0.5)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Loader = Callable[[str, torch.dtype], tuple]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _default_loader(name: str, dtype: torch.dtype):
    from .models import load_model

    return load_model(name, dtype=dtype)


def _set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be >= 1, got {n}")
        # The C++ core follows torch's thread count (ops sync it before each call).
        torch.set_num_threads(n)


def _kernel_info() -> str:
    try:
        from . import _C  # type: ignore[attr-defined]
        from . import _ext

        _ext.load()  # chooses the threading
        return (f"C++ core, ISA {_C.get_isa()} (supported: {', '.join(_C.supported_isas())}), "
                f"{_C.get_threading()} threads")
    except Exception as e:  # not built: the pure-torch reference runs
        return f"pure-torch reference (C++ extension unavailable: {type(e).__name__})"


def machine_info(dtype: torch.dtype) -> str:
    """The header line of the CLI's reports, from machine.describe_machine()."""
    m = describe_machine()
    return (
        f"machine: {m['cpu']} | {m['cpu_count']} logical CPUs | torch {m['torch']}, "
        f"{m['torch_threads']} threads | transformers {m['transformers']} | "
        f"glass_kernels {m['glass_kernels']} ({m['glass_kernels_commit'][:12]}) | "
        f"dtype {str(dtype).replace('torch.', '')} | kernels: {_kernel_info()}"
    )


def _model_key(name: str) -> str:
    from .models import _ALIASES, MODELS

    key = _ALIASES.get(name.lower(), name.lower())
    if key in MODELS:
        return key
    return Path(name).expanduser().resolve().name or "model"


def stats_cache_path(model, name: str, source: str = "nps", num_sequences: int | None = None,
                     seq_len: int | None = None, seed: int = 0, prompt: str = "bos") -> Path:
    """Where the CLI caches a model's global statistics: ``<cache>/stats/<model>-<fingerprint>-<sizes>``.

    Keyed by the FFN fingerprint (same for the fp32 / bf16 loads of the same weights) and by the
    calibration settings, so changing either computes new statistics instead of reusing stale ones.
    """
    from .calibrate import DEFAULT_NUM_SEQUENCES, DEFAULT_SEQ_LEN
    from .models import cache_dir
    from .stats import model_signature

    fp = model_signature(model)["fingerprint"]
    n = DEFAULT_NUM_SEQUENCES if num_sequences is None else num_sequences
    L = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    tag = f"{source}{n}x{L}-{prompt}-seed{seed}"
    return cache_dir() / "stats" / f"{_model_key(name)}-{fp[:16]}-{tag}.safetensors"


def _cached_or_calibrated_stats(model, tok, name: str, *, num_sequences=None, seq_len=None, seed=0,
                                prompt="bos", progress=True, out=sys.stdout):
    from .calibrate import calibrate
    from .stats import GlobalStats

    path = stats_cache_path(model, name, "nps", num_sequences, seq_len, seed, prompt)
    if path.exists():
        stats = GlobalStats.load(path, model=model)
        print(f"global statistics: cached {path} ({stats.num_tokens} tokens, calibrated in "
              f"{stats.meta.get('elapsed_s', '?')} s)", file=out)
        return stats, path
    print(f"global statistics: none cached for this model; calibrating (NPS, once) -> {path}", file=out)
    kw = {} if seq_len is None else {"seq_len": seq_len}
    t0 = time.perf_counter()
    stats = calibrate(model, tok, "nps", num_sequences=num_sequences, seed=seed, progress=progress,
                      prompt=prompt, **kw)
    dt = time.perf_counter() - t0
    stats.save(path)
    print(f"calibration: {stats.meta['num_sequences']} sequences x {stats.meta['seq_len']} tokens, "
          f"{stats.num_tokens} tokens used, {dt:.1f} s", file=out)
    return stats, path


def _encode(tok, text: str, chat: bool) -> torch.Tensor:
    from .models import prompt_ids

    return torch.tensor([prompt_ids(tok, text, chat)], dtype=torch.long)


def _use_chat(tok, flag: str) -> bool:
    has = getattr(tok, "chat_template", None) is not None
    if flag == "yes" and not has:
        raise SystemExit("--chat yes: this tokenizer has no chat template")
    return has if flag == "auto" else flag == "yes"


class _DecodeTimer:
    """A generate() streamer that timestamps the first new token and the end (prefill excluded)."""

    def __init__(self) -> None:
        self.calls = 0
        self.new_tokens = 0
        self.t_first: float | None = None
        self.t_end: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 1:  # the prompt
            return
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.new_tokens += 1

    def end(self) -> None:
        self.t_end = time.perf_counter()

    def decode_tps(self) -> float:
        if self.t_first is None or self.t_end is None or self.new_tokens < 2:
            return float("nan")
        return (self.new_tokens - 1) / max(self.t_end - self.t_first, 1e-9)


def _generate(model, tok, ids, max_new_tokens, *, fixed_length=False, timer=None, sample=None):
    kw = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids))
    if fixed_length:
        kw["min_new_tokens"] = max_new_tokens
    if sample is None:
        kw.update(do_sample=False, top_k=None, top_p=None, temperature=None)
    else:
        kw.update(do_sample=True, **sample)
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None)
    if pad is not None:
        kw["pad_token_id"] = pad
    if timer is not None:
        kw["streamer"] = timer
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    return out[:, ids.shape[1]:]


def _teacher_forced_agreement(model, ids, cont) -> tuple[int, int]:
    """(matches, positions): argmax of ``model`` at the continuation's positions 2..N vs ``cont``."""
    if cont.shape[1] < 2:
        return 0, 0
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        out2 = model(cont[:, :-1], **cache_kwargs(model, output_cache(out)), use_cache=True)
    pred = out2.logits.argmax(-1)
    return int((pred == cont[:, 1:]).sum()), int(cont.shape[1] - 1)


def _same_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a.reshape(-1)[:n] != b.reshape(-1)[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def _side_by_side(left_title, left, right_title, right, width) -> str:
    col = max(20, (width - 3) // 2)
    lw = textwrap.wrap(left.replace("\n", " ⏎ "), col) or [""]
    rw = textwrap.wrap(right.replace("\n", " ⏎ "), col) or [""]
    lines = [f"{left_title:<{col}} | {right_title}", f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(lw), len(rw))):
        l = lw[i] if i < len(lw) else ""
        r = rw[i] if i < len(rw) else ""
        lines.append(f"{l:<{col}} | {r}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------

def run_demo(args, loader: Loader, out=sys.stdout) -> int:
    from .patch import GlassConfig, patch, session, unpatch

    _set_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    print(machine_info(dtype), file=out)
    t0 = time.perf_counter()
    model, tok = loader(args.model, dtype)
    print(f"model: {args.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters), loaded in {time.perf_counter() - t0:.1f} s", file=out)
    base = GlassConfig()
    method = args.method or base.method
    lam = base.lam if args.lam is None else args.lam
    cfg = GlassConfig(method=method, keep=args.keep, lam=lam)  # validates early
    stats = None
    if method in ("a-glass", "i-glass", "global"):
        if args.stats:
            from .stats import GlobalStats

            stats = GlobalStats.load(args.stats, model=model)
            print(f"global statistics: {args.stats}", file=out)
        else:
            stats, _ = _cached_or_calibrated_stats(
                model, tok, args.model, num_sequences=args.calib_sequences, seq_len=args.calib_seq_len,
                progress=not args.no_progress, out=out)
    patch(model, stats=stats, method=method, keep=args.keep, lam=lam)  # measures the decode setting once
    print(f"decode kernel: {session(model).decode_tuning.describe()}", file=out)
    unpatch(model)
    chat = _use_chat(tok, args.chat)
    prompts = list(args.prompt) if args.prompt else list(DEFAULT_PROMPTS)
    encoded = [_encode(tok, p, chat) for p in prompts]
    keeps = sorted(set(DEMO_KEEPS) | {args.keep}, reverse=True)
    N = args.max_new_tokens
    width = shutil.get_terminal_size((140, 24)).columns

    def set_state(keep):
        from .patch import is_patched

        if is_patched(model):
            unpatch(model)
        if keep is not None:
            patch(model, stats=stats, method=method, keep=keep, lam=lam)

    print(f"\nGLASS config: method={cfg.method} lam={cfg.lam} keep={cfg.keep} "
          f"(greedy, up to {N} new tokens, {'chat template' if chat else 'raw text'})", file=out)

    # 1. side by side + agreement (dense continuation stops at EOS, as a user would see it)
    dense_conts = []
    agree = {k: [0, 0] for k in keeps}
    prefix = {k: [] for k in keeps}
    for p, ids in zip(prompts, encoded):
        set_state(None)
        d = _generate(model, tok, ids, N)
        dense_conts.append(d)
        shown = {}
        for k in keeps:
            set_state(k)
            m, n = _teacher_forced_agreement(model, ids, d)
            agree[k][0] += m
            agree[k][1] += n
            g = _generate(model, tok, ids, N)
            prefix[k].append(_same_prefix(d, g))
            if k == args.keep:
                shown[k] = g
        set_state(None)
        print(f"\n>>> {p}", file=out)
        print(_side_by_side("dense", tok.decode(d[0], skip_special_tokens=True),
                            f"GLASS {method} keep={args.keep}", tok.decode(shown[args.keep][0], skip_special_tokens=True),
                            width), file=out)

    # 2. timing: warm-up, then rounds over prompts, dense and every keep in rotating order
    configs = [None] + keeps
    tps = {c: [] for c in configs}
    steps = {k: [0, 0] for k in keeps}  # decode steps of the timed runs: [ran sparse, all]
    for c in configs:  # warm-up
        set_state(c)
        _generate(model, tok, encoded[0], min(N, 8), fixed_length=True)
    for r in range(args.repeats):
        for i, ids in enumerate(encoded):
            shift = (r * len(encoded) + i) % len(configs)
            for c in configs[shift:] + configs[:shift]:
                set_state(c)
                timer = _DecodeTimer()
                _generate(model, tok, ids, N, fixed_length=True, timer=timer)
                tps[c].append(timer.decode_tps())
                if c is not None:  # patched just now by set_state: its counters cover this run only
                    n = session(model).counters()
                    steps[c][0] += n["sparse"]
                    steps[c][1] += n["sparse"] + n["dense"]
    set_state(None)
    dense_tps = statistics.median(tps[None])
    print(f"\ndecode speed: greedy, {N} new tokens per run, prefill excluded, median (and min-max) of "
          f"{len(tps[None])} runs per row ({args.repeats} rounds x {len(prompts)} prompts, alternating, after a "
          f"warm-up)", file=out)
    print(f"agreement: teacher-forced top-1 agreement with the dense greedy tokens "
          f"({agree[keeps[0]][1]} positions); greedy prefix: identical leading tokens of free-running "
          f"greedy generation (mean over prompts)", file=out)
    hdr = (f"{'config':<22}{'decode tok/s':>14}{'min-max':>14}{'speed-up':>10}{'top-1 agree':>13}"
           f"{'greedy prefix':>15}{'sparse steps':>16}")

    def spread(v):  # every run's tok/s, not only the median's: min-max
        return f"{min(v):.1f}-{max(v):.1f}"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    mean_len = statistics.mean(int(d.shape[1]) for d in dense_conts)
    print(f"{'dense':<22}{dense_tps:>14.1f}{spread(tps[None]):>14}{1.0:>9.2f}x{'100.0%':>13}{mean_len:>15.1f}"
          f"{'-':>16}", file=out)
    for k in keeps:
        t = statistics.median(tps[k])
        a = agree[k][0] / max(agree[k][1], 1)
        print(f"{f'{method} keep={k:g}':<22}{t:>14.1f}{spread(tps[k]):>14}{t / dense_tps:>9.2f}x{100 * a:>12.1f}%"
              f"{statistics.mean(prefix[k]):>15.1f}{f'{steps[k][0]}/{steps[k][1]}':>16}", file=out)
    print("sparse steps: decode steps (forwards after the prompt) of the timed runs that ran the sparse kernel",
          file=out)
    not_sparse = [k for k in keeps if steps[k][0] != steps[k][1]]
    if not_sparse and method != "dense":
        print(f"WARNING: some decode steps ran dense at keep {', '.join(f'{k:g}' for k in not_sparse)}: "
              "the speed-ups above are not GLASS's (see the logged warning)", file=out)
    return 0


# --------------------------------------------------------------------------------------------------
# generate / calibrate
# --------------------------------------------------------------------------------------------------

def run_generate(args, loader: Loader, out=sys.stdout) -> int:
    from .patch import is_patched, patch, session

    _set_threads(args.threads)
    model, tok = loader(args.model, _DTYPES[args.dtype])
    if args.method != "dense":
        stats = None
        # the global methods read the statistics; the adaptive options read the fit stored with them
        if args.method in ("a-glass", "i-glass", "global") or isinstance(args.lam, str) \
                or args.keep_split == "fitted":
            if args.stats:
                from .stats import GlobalStats

                stats = GlobalStats.load(args.stats, model=model)
            else:
                stats, _ = _cached_or_calibrated_stats(model, tok, args.model, progress=not args.no_progress,
                                                       out=sys.stderr)
        kw = {} if args.lam is None else {"lam": args.lam}
        if args.keep_split is not None:
            kw["keep_split"] = args.keep_split
        patch(model, stats=stats, method=args.method, keep=args.keep, **kw)
    ids = _encode(tok, args.prompt, _use_chat(tok, args.chat))
    sample = None
    if args.do_sample:
        torch.manual_seed(args.seed)
        sample = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    timer = _DecodeTimer()
    t0 = time.perf_counter()
    g = _generate(model, tok, ids, args.max_new_tokens, timer=timer, sample=sample)
    dt = time.perf_counter() - t0
    print(tok.decode(g[0], skip_special_tokens=True), file=out)
    sparse = f"; {session(model).decode_summary()}" if is_patched(model) else ""
    print(f"[{args.method}{'' if args.method == 'dense' else f' keep={args.keep}'}: {g.shape[1]} tokens in "
          f"{dt:.2f} s, decode {timer.decode_tps():.1f} tok/s{sparse}]", file=sys.stderr)
    return 0


def run_tune(args, loader: Loader, out=sys.stdout) -> int:
    """Measure the decode kernel's per-machine setting on a real model (and cache it)."""
    from . import tuning
    from .patch import patch, session

    _set_threads(args.threads)
    print(machine_info(_DTYPES[args.dtype]), file=out)
    model, _ = loader(args.model, _DTYPES[args.dtype])
    patch(model, method="griffin", keep=args.keep, tune=False)  # the neuron-major layout to time
    # layout "auto": both layouts timed (the weights are converted in place between them)
    t = tuning.tuning_for_model(session(model)._state.sites, tune=True, keep=args.keep, force=True, layout="auto")
    if t.gbps is None:
        print(f"nothing measured: {t.describe()}", file=out)
        return 0
    print(f"GB/s of selected FFN weights, one token, keep {args.keep:g}, every layer of {args.model} per timing "
          f"(median of 5), by ISA / neurons in flight / prefetch distance:", file=out)
    for cand, v in sorted(t.gbps.items(), key=lambda kv: -kv[1]):
        print(f"  {cand:<24}{v:8.2f}", file=out)
    print("(entries ending in /bundled: the neuron-bundled layout, gate/up/down rows of a neuron adjacent; "
          "/compact: the same kernel reading a compacted copy of the selected rows)", file=out)
    print(f"chosen: {t.describe()} -> {tuning.cache_file()}", file=out)
    return 0


def run_calibrate(args, loader: Loader, out=sys.stdout) -> int:
    from .calibrate import calibrate

    _set_threads(args.threads)
    if args.stats and not args.fit:
        raise SystemExit("--stats only makes sense with --fit (fit an existing statistics file)")
    model, tok = loader(args.model, _DTYPES[args.dtype])
    source = args.source
    t0 = time.perf_counter()
    if args.stats:
        from .stats import GlobalStats

        stats = GlobalStats.load(args.stats, model=model)
        path = Path(args.output or args.stats)
    else:
        stats = calibrate(model, tok, source, num_sequences=args.num_sequences, seq_len=args.seq_len,
                          batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                          prompt=args.nps_prompt)
        path = Path(args.output) if args.output else stats_cache_path(
            model, args.model, "nps" if source == "nps" else "text", stats.meta["num_sequences"], args.seq_len,
            args.seed, args.nps_prompt)
    if args.fit:
        stats = _fit(model, tok, stats, args.fit_prompts, progress=not args.no_progress, out=out)
    dt = time.perf_counter() - t0
    stats.save(path)
    print(f"{stats!r}\n{stats.num_tokens} tokens in {dt:.1f} s -> {path}", file=out)
    return 0


def _fit(model, tok, stats, prompts_file: str | None, *, progress: bool, out):
    from .adaptive import fit_prompts, fit_selection, lam_of_length, refine_summary

    texts = None
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
        if not texts:
            raise SystemExit(f"--fit-prompts {prompts_file!r} holds no prompt")
    chat = getattr(tok, "chat_template", None) is not None
    prompts = [p for _, p in fit_prompts(tok, chat, texts=texts)]
    stats = fit_selection(model, tok, stats, prompts=prompts, progress=progress)
    f = stats.fit
    lam40 = float(lam_of_length(f.tau, torch.tensor([40]))[0])
    print(f"selection fit: tau {f.tau:g} (lambda {lam40:.2f} at 40 prompt tokens); per-layer tau "
          f"{[round(t) for t in f.layer_tau]}; per-layer keep: share {f.keep_shrink:g} of the reallocation, "
          + "; refinement " + "; ".join(refine_summary(k, r) for k, r in f.meta.get("refine", {}).items()),
          file=out)
    return stats


# --------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------

def _keep(v: str) -> float:
    x = float(v)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"keep must be in (0, 1], got {v}")
    return x


def _lam(v: str) -> float | str:
    from .patch.config import LAM_MODES

    if v in LAM_MODES:  # adaptive lambda: needs statistics with a selection fit (calibrate --fit)
        return v
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lam must be a float in [0, 1] or one of {LAM_MODES}, got {v!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"lam must be in [0, 1], got {v}")
    return x


def _pos_int(v: str) -> int:
    x = int(v)
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return x


def _common(p: argparse.ArgumentParser, model_default="smollm2") -> None:
    p.add_argument("--model", default=model_default,
                   help="smollm2 | gemma3-270m | a local Hugging Face model folder (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model dtype (default: %(default)s)")
    p.add_argument("--threads", type=_pos_int, default=None, help="torch / C++ core threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _methods():
    from .patch.config import METHODS

    return METHODS


def build_parser(argv_hint: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser. ``eval`` / ``bench`` options come from the evaluation package, imported only
    when that subcommand is requested (``argv_hint``), so the other subcommands never import it."""
    parser = argparse.ArgumentParser(prog="python -m glass_kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", metavar="{demo,generate,calibrate,tune,eval,bench}")
    sub.required = True
    methods = _methods()

    d = sub.add_parser("demo", help="SmolLM2 dense vs GLASS: continuations side by side + decode speed table")
    _common(d)
    d.add_argument("--method", choices=methods, default=None, help="GLASS method (default: GlassConfig's)")
    d.add_argument("--keep", type=_keep, default=0.5, help="keep fraction shown side by side (default: %(default)s)")
    d.add_argument("--lam", type=_lam, default=None, help="lambda (default: GlassConfig's)")
    d.add_argument("--max-new-tokens", type=_pos_int, default=64, help="new tokens per run (default: %(default)s)")
    d.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: 3 built-in)")
    d.add_argument("--repeats", type=_pos_int, default=3, help="timing rounds over the prompts (default: %(default)s)")
    d.add_argument("--stats", default=None, help="GlobalStats file (default: cached, else calibrate once)")
    d.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                   help="format prompts with the chat template (default: if the tokenizer has one)")
    d.add_argument("--calib-sequences", type=_pos_int, default=None, help="NPS sequences if calibrating")
    d.add_argument("--calib-seq-len", type=_pos_int, default=None, help="NPS tokens per sequence if calibrating")

    g = sub.add_parser("generate", help="prompt -> text, dense or patched")
    _common(g)
    g.add_argument("prompt", help="the prompt")
    g.add_argument("--method", choices=methods, default="a-glass", help="'dense' = unpatched (default: %(default)s)")
    g.add_argument("--keep", type=_keep, default=0.5)
    g.add_argument("--lam", type=_lam, default=None,
                   help="lambda in [0, 1], or 'length' / 'layer' (fitted: needs stats made by calibrate --fit)")
    g.add_argument("--keep-split", choices=("uniform", "fitted"), default=None,
                   help="per-layer keep: 'fitted' spends the same FFN bytes where the fit says they matter most")
    g.add_argument("--stats", default=None, help="GlobalStats file (default: cached, else calibrate once)")
    g.add_argument("--max-new-tokens", type=_pos_int, default=128)
    g.add_argument("--chat", choices=("auto", "yes", "no"), default="auto")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("tune", help="measure the decode kernel's best setting for this machine on a model")
    _common(t)
    t.add_argument("--keep", type=_keep, default=0.5, help="keep fraction timed (default: %(default)s)")

    c = sub.add_parser("calibrate", help="compute a model's global statistics -> .safetensors")
    _common(c)
    c.add_argument("--source", default="nps", help="'nps' (self-generated, default) or a UTF-8 text file")
    c.add_argument("--output", "-o", default=None, help="output file (default: the CLI's stats cache)")
    c.add_argument("--num-sequences", type=_pos_int, default=None, help="default: 64 (nps) / all text")
    c.add_argument("--seq-len", type=_pos_int, default=256)
    c.add_argument("--batch-size", type=_pos_int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--nps-prompt", choices=("bos", "chat"), default="bos",
                   help="NPS prompt: BOS token only (default) or the empty chat prompt")
    c.add_argument("--fit", action="store_true",
                   help="also fit the adaptive selection (lam 'length' / 'layer', keep_split 'fitted') and store "
                        "it in the file (a few minutes; glass_kernels.fit_selection)")
    c.add_argument("--fit-prompts", default=None,
                   help="with --fit: a UTF-8 file of prompts, one per line, like the ones you will serve "
                        "(default: the packaged tune prompts, at four lengths)")
    c.add_argument("--stats", default=None, help="with --fit: fit this existing statistics file instead of "
                   "calibrating new statistics (written back to --output, default the same file)")

    want = set(argv_hint or [])
    for name, add in (("eval", "add_eval_arguments"), ("bench", "add_bench_arguments")):
        sp = sub.add_parser(name, help=f"the evaluation suite's `{name}` (glass_kernels.evaluation)",
                            add_help=name in want)
        if name in want:
            try:
                from .evaluation import cli as ecli

                getattr(ecli, add)(sp)
            except (ImportError, AttributeError) as e:
                sp.set_defaults(_unavailable=f"{type(e).__name__}: {e}")
        else:
            sp.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None, *, loader: Loader | None = None, out=None) -> int:
    """Entry point. ``loader(name, dtype) -> (model, tokenizer)`` can be injected (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[:1])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    loader = loader or _default_loader
    out = out or sys.stdout
    if args.command == "demo":
        return run_demo(args, loader, out)
    if args.command == "generate":
        return run_generate(args, loader, out)
    if args.command == "calibrate":
        return run_calibrate(args, loader, out)
    if args.command == "tune":
        return run_tune(args, loader, out)
    if getattr(args, "_unavailable", None):
        parser.error(f"`{args.command}` is unavailable: glass_kernels.evaluation.cli could not be used "
                     f"({args._unavailable})")
    from .evaluation import cli as ecli

    run = ecli.run_eval if args.command == "eval" else ecli.run_bench
    rc = run(args)
    return int(rc or 0)
