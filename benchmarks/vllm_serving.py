"""Serving throughput with the vLLM plugin: stock vLLM against GLASS, by batch size (issue 17).

Run in the vLLM venv (scripts/setup_vllm.sh):

    .venv-vllm/bin/python benchmarks/vllm_serving.py [--model smollm2] [--batches 1,4,16] [--keeps 0.5,0.3]
        [--tokens 64] [--repeats 3] [--out reports/vllm]

One engine per option (stock; GLASS per keep and batch-set mode), each timing every batch size: B
held-out prompts (chat-formatted where the model has a template), greedy, --tokens new tokens each (EOS ignored), vLLM's default processes.
Per run: wall time of the whole batch, of its prefill alone (the same requests with 1 new token),
and from them output tokens/s and decode tokens/s (tokens after the first / (wall - prefill)).
FFN bytes per decode step: the weight rows the plugin's FFNs read, averaged over the runs' decode
steps (the distinct rows of each step's sets, or every row where per-request sets run as a masked
dense FFN); stock: every FFN weight. Writes <out>/<model>.json, .md (median and min-max of the
runs) and .png (decode tokens/s against batch size, one line per option).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# The plugin's state is read from the engine's worker process through LLM.apply_model(describe), which
# sends a function: vLLM refuses that without this switch (a benchmark, not a server exposed to anyone).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM's CPU worker otherwise keeps one core for its front end: on a 2-core machine the model would
# run on one thread. Every option runs its model on all cores (recorded as "threads").
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--keeps", default="0.5,0.3")
    p.add_argument("--batch-sets", default="per-request,shared",
                   help="GLASS batch-set modes to time (per-request | shared)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="reports/vllm")
    return p.parse_args(argv)


def _prompts(tok, n: int) -> list[list[int]]:
    from glass_kernels.evaluation.data import load_prompts
    from glass_kernels.models import is_chat_model, prompt_ids

    texts = [p["text"] for p in load_prompts() if p["split"] == "heldout"]
    chat = is_chat_model(tok)  # Gemma-3-270M here has no chat template: plain text
    return [prompt_ids(tok, texts[i % len(texts)], chat=chat) for i in range(n)]


def _engine(folder: str, glass: dict | None, max_seqs: int):
    from vllm import LLM

    extra = {"additional_config": {"glass": glass}} if glass else {}
    return LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=1024, enable_prefix_caching=False,
               max_num_seqs=max_seqs, seed=0, **extra)


def _time(llm, prompts, tokens: int) -> float:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return time.perf_counter() - t0


def run_option(folder, name, glass, batches, prompts, tokens, repeats, log):
    llm = _engine(folder, glass, max(batches))
    rows = []
    try:
        from glass_kernels.vllm_plugin import describe

        info = llm.apply_model(describe)[0]
        threads = info["threads"]
        for B in batches:
            batch = prompts[:B]
            _time(llm, batch, 4)  # warm: first-request allocations
            walls, prefills = [], []
            before = llm.apply_model(describe)[0].get("counters", {})
            for r in range(repeats):
                prefills.append(_time(llm, batch, 1))
                walls.append(_time(llm, batch, tokens))
                log(f"  {name} B={B} run {r + 1}/{repeats}: {walls[-1]:.2f} s (prefill {prefills[-1]:.2f} s)")
            after = llm.apply_model(describe)[0].get("counters", {})
            steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
            step_bytes = info["ffn_bytes_dense"] if glass is None else \
                (after.get("ffn_bytes_read", 0) - before.get("ffn_bytes_read", 0)) / max(steps, 1)
            out_tps = [B * tokens / w for w in walls]
            dec_tps = [B * (tokens - 1) / max(w - p, 1e-9) for w, p in zip(walls, prefills)]
            rows.append({"option": name, "batch": B, "wall_s": walls, "prefill_s": prefills,
                         "output_tok_s": out_tps, "decode_tok_s": dec_tps,
                         "ffn_bytes_per_step": step_bytes, "threads": threads})
    finally:
        del llm
        import gc

        gc.collect()
    return rows


def _fmt(xs, digits=1):
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def write_report(out: Path, model: str, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{model}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stock = {r["batch"]: r for r in rows if r["option"] == "stock"}
    lines = [f"# vLLM serving, {model}", "", ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| option | batch | output tok/s | decode tok/s | decode vs stock | FFN MB / decode step | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = stock.get(r["batch"])
        ratio = "" if s is None or r is s else \
            f"{statistics.median(r['decode_tok_s']) / statistics.median(s['decode_tok_s']):.2f}x"
        mb = "" if r["ffn_bytes_per_step"] is None else f"{r['ffn_bytes_per_step'] / 2**20:.0f}"
        lines.append(f"| {r['option']} | {r['batch']} | {_fmt(r['output_tok_s'])} | {_fmt(r['decode_tok_s'])} | "
                     f"{ratio} | {mb} | {_fmt(r['wall_s'], 2)} |")
    lines += ["", "Median (min-max) of the runs. Decode tok/s: tokens after the first / (wall - prefill wall)."]
    (out / f"{model}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for option in dict.fromkeys(r["option"] for r in rows):
        pts = [(r["batch"], statistics.median(r["decode_tok_s"])) for r in rows if r["option"] == option]
        ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=option)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"vLLM CPU serving, {model} ({meta['cpu']}, {meta['threads']} threads)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{model}.png", dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    import vllm

    import glass_kernels
    from glass_kernels.cli import _cached_or_calibrated_stats
    from glass_kernels.machine import cpu_name
    from glass_kernels.models import load_model, model_cache_dir

    batches = [int(b) for b in args.batches.split(",")]
    keeps = [float(k) for k in args.keeps.split(",")]
    model, tok = load_model(args.model)
    _, stats_path = _cached_or_calibrated_stats(model, tok, args.model, out=sys.stderr)
    folder = str(model_cache_dir(args.model))
    prompts = _prompts(tok, max(batches))
    del model
    options = [("stock", None)]
    for keep in keeps:
        for mode in args.batch_sets.split(","):
            glass = {"method": "a-glass", "keep": keep, "stats": str(stats_path)}
            if mode != "per-request":
                glass["batch_sets"] = mode
            options.append((f"a-glass {keep:g} {mode}", glass))
    t0 = time.time()
    rows = []
    for name, glass in options:
        print(f"{name} ({time.time() - t0:.0f} s)", file=sys.stderr)
        rows += run_option(folder, name, glass, batches, prompts, args.tokens, args.repeats,
                           lambda m: print(m, file=sys.stderr))
    meta = {"cpu": cpu_name(), "threads": rows[0]["threads"],
            "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"], "model": f"{args.model} (4-bit GGUF dequantized to fp32)",
            "tokens": args.tokens, "repeats": args.repeats, "vllm": vllm.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "glass_kernels": glass_kernels.__version__,
            "python": platform.python_version(), "elapsed_s": round(time.time() - t0)}
    write_report(Path(args.out), args.model, rows, meta)
    print((Path(args.out) / f"{args.model}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
