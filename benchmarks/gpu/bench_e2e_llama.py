"""End to end on a GPU: a random-weight Llama of 1B shape in bf16 generating 256 tokens, dense vs
GLASS-patched (method "random", which needs no statistics), eager and with CUDA graphs.

Model: Llama-3.2-1B's shape (d 2048, D 8192, 16 layers, 32 heads / 8 KV heads, head_dim 64,
vocab 128256, tied embeddings), random weights (no hub), bf16, on CUDA.
Modes:
- eager:   dynamic KV cache, no compilation (``generate(..., disable_compile=True)``);
- graphs:  static KV cache + torch.compile(mode="reduce-overhead") of the forward, i.e. CUDA graphs
           (transformers' automatic compile of generate with a static cache).
For each mode and model, one warm-up generate (compilation, graph capture, Triton autotuning),
then ``--reps`` timed generates of ``--new-tokens`` greedy tokens (EOS disabled, so always that
many), and a generate of 1 token to separate the prefill: decode tokens/s = (N - 1) / (t_N - t_1).

    python benchmarks/gpu/bench_e2e_llama.py --out e2e.json
    python benchmarks/gpu/bench_e2e_llama.py --smoke    # CPU, tiny Llama, Triton interpreter

Without CUDA (and without --smoke) it prints SKIP and exits 0. A mode that fails (e.g. a graph
break the patch cannot survive) is reported with its error, not hidden.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
            tie_word_embeddings=True)


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny Llama on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--modes", default="eager,graphs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _generate_time(model, ids, n, mode, device, reps):
    import torch
    from transformers import CompileConfig

    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if mode == "eager":
        kw["disable_compile"] = True
    else:  # static cache: transformers compiles the forward (CUDA graphs with reduce-overhead)
        kw.update(cache_implementation="static",
                  compile_config=CompileConfig(mode="reduce-overhead", fullgraph=False))
    times, out = [], None
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, **kw)
        _sync(device)
        times.append(time.perf_counter() - t0)
    assert out.shape[1] == ids.shape[1] + n, f"generated {out.shape[1] - ids.shape[1]} tokens, not {n}"
    return statistics.median(times), out


def run_case(model, ids, args, mode, device):
    n = args.new_tokens
    if not args.smoke:
        _generate_time(model, ids, n, mode, device, 1)  # warm-up: compile, capture, autotune
    t_n, out = _generate_time(model, ids, n, mode, device, args.reps)
    t_1, _ = _generate_time(model, ids, 1, mode, device, args.reps)
    return {"total_s": t_n, "prefill_plus_1_s": t_1, "tokens_per_s": n / t_n,
            "decode_tokens_per_s": (n - 1) / (t_n - t_1) if t_n > t_1 else None}, out


def main(argv=None) -> int:
    args = _parse(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("SKIP: no CUDA device; bench_e2e_llama measures GPUs only (use --smoke on CPU)")
        return 0
    from gpu_common import device_facts, write_json
    from transformers import LlamaConfig, LlamaForCausalLM

    from glass_kernels.patch import GlassConfig, is_patched, patch, unpatch

    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        args.new_tokens, args.prompt_len, args.reps = min(args.new_tokens, 3), min(args.prompt_len, 5), 1
        args.modes = "eager"
    facts = device_facts(device)
    print(f"device: {facts['name']}  torch {facts['torch']}  triton {facts['triton']}"
          + ("  [SMOKE: CPU interpreter, timings are not performance figures]" if args.smoke else ""))
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(**(TINY if args.smoke else LLAMA_1B))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, cfg.vocab_size, (1, args.prompt_len), device=device)
    # On CUDA "auto" already picks Triton; the smoke forces it so the CPU run goes through the
    # Triton kernels under the interpreter rather than the C++ / reference path.
    backend = "triton" if args.smoke else "auto"
    results = []
    for mode in args.modes.split(","):
        for variant in ("dense", "glass"):
            row = {"mode": mode, "model": variant, "keep": args.keep if variant == "glass" else 1.0}
            try:
                if variant == "glass":
                    patch(model, config=GlassConfig(method="random", keep=args.keep, backend=backend))
                if mode != "eager":
                    torch._dynamo.reset()  # graphs of the other variant must not be reused
                r, _ = run_case(model, ids, args, mode, device)
                row.update(r)
            except Exception as e:  # report, do not hide: the table shows which mode failed
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            finally:
                if variant == "glass" and is_patched(model):
                    unpatch(model)
            results.append(row)
    base = {r["mode"]: r for r in results if r["model"] == "dense" and "error" not in r}
    print(f"| mode | model | tokens | total s | tok/s | decode tok/s | x dense (decode) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | {r['model']} | {args.new_tokens} | failed: {r['error'][:80]} | | | |")
            continue
        b = base.get(r["mode"])
        ratio = (r["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                 if b and r["decode_tokens_per_s"] and b["decode_tokens_per_s"] else None)
        dec = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        print(f"| {r['mode']} | {r['model']} | {args.new_tokens} | {r['total_s']:.3f} | "
              f"{r['tokens_per_s']:.1f} | {dec} | {f'{ratio:.2f}' if ratio else '-'} |")
    if args.out:
        write_json(args.out, {"device": facts, "smoke": args.smoke, "config": cfg.to_dict(),
                              "dtype": str(dtype), "new_tokens": args.new_tokens,
                              "prompt_len": args.prompt_len, "keep": args.keep,
                              "command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                              "results": results})
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
