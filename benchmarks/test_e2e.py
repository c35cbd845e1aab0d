"""End-to-end speed of the real models, dense vs patched (issue 5, speed suite).

    pytest benchmarks/test_e2e.py --benchmark-only [--benchmark-json=F]
    GLASS_BENCH_QUICK=1 ...        SmolLM2 only, keep 0.5, shorter decode
    GLASS_BENCH_E2E_MODELS / _KEEPS (comma lists), _TOKENS, _ROUNDS, GLASS_BENCH_THREADS: sizes
    GLASS_BENCH_E2E_WEIGHTS=int8|int4  patch with quantized FFN rows (GlassConfig.weights); the paired
                                       dense rounds run the model in its float dtype

Cases (fp32, batch 1, greedy):

* ``test_mlp_share[model]``: one dense decode step, with the time spent inside the FFN modules
  measured by forward pre/post hooks; f = FFN share of the step. The Amdahl ceiling of the
  end-to-end speed-up at keep k, if the sparse FFN cost exactly k times the dense one and nothing
  else changed, is 1 / ((1 - f) + f * k).
* ``test_decode[model-mode]``: ``DECODE_TOKENS`` decode steps after the prompt (prefill and the
  one-off neuron selection excluded, done in the untimed setup); extra_info: tokens/s, speed-up
  vs dense, the Amdahl ceiling and the ideal FFN-only speed-up 1/k next to it. The speed-up is
  paired: before each patched round the setup unpatches the model and times a dense decode of the
  same length, so slow drift of a shared machine (which moved whole cases by 10-20%) cancels.
* ``test_ttft[model-mode]``: time to first token = prompt forward (+ the neuron selection for
  the patched model, which happens before the first decode step). The difference is the
  selection cost (local statistics during prefill + ranking + set preparation).

Every weight of the model (dense and patched rounds alike) sits in huge-page-advised memory, as
``patch`` gives the FFN rows its kernel reads: the speed-up then measures sparsity, not page size (on
the Xeon VM, 2026-12-06, a 1 GiB read ran 44% faster from huge pages than from 4 KiB pages).

Numbers are machine- and load-dependent; nothing here asserts a timing. The bench report
(``python -m glass_kernels bench``) turns the JSON into a table and plot.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from conftest import machine_info, quick_mode, set_threads
from glass_kernels.hf_compat import cache_kwargs, output_cache

QUICK = quick_mode()


def _env_list(name, default, cast):
    v = os.environ.get(name)
    return tuple(cast(x) for x in v.split(",")) if v else default


# Sizes can be overridden for a loaded machine, e.g. GLASS_BENCH_E2E_TOKENS=8 GLASS_BENCH_E2E_ROUNDS=3.
MODELS = _env_list("GLASS_BENCH_E2E_MODELS", ("smollm2",) if QUICK else ("smollm2", "gemma3-270m"), str)
KEEPS = _env_list("GLASS_BENCH_E2E_KEEPS", (0.5,) if QUICK else (0.5, 0.4, 0.3, 0.2), float)
DECODE_TOKENS = int(os.environ.get("GLASS_BENCH_E2E_TOKENS", 16 if QUICK else 32))
ROUNDS = int(os.environ.get("GLASS_BENCH_E2E_ROUNDS", 3 if QUICK else 5))
THREADS = int(os.environ.get("GLASS_BENCH_THREADS", "2"))
WEIGHTS = os.environ.get("GLASS_BENCH_E2E_WEIGHTS") or None
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

_models: dict = {}


def _load(name: str):
    if name not in _models:
        from glass_kernels.models import ModelNotInstalledError, load_model

        try:
            model, tok = load_model(name, torch.float32)
        except ModelNotInstalledError as e:
            pytest.skip(f"{name} not installed: {e}")
        _weights_to_huge_pages(model)
        if getattr(tok, "chat_template", None) is not None:
            enc = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            ids = enc["input_ids"]
        else:
            ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        _models[name] = (model, tok, ids)
    return _models[name]


def _weights_to_huge_pages(model) -> None:
    """Every parameter in huge-page-advised memory (same layout and values; small ones stay): each
    FFN layer's weights in one allocation, as patch and unpatch place them (ffn.layout
    .pack_huge_pages: SmolLM2's 3.4 MiB operands each alone would keep 41% in 4 KiB pages), so that
    the dense rounds read pages of the same size as the patched ones."""
    from glass_kernels.ffn import find_ffn_sites
    from glass_kernels.ffn.layout import pack_huge_pages, to_huge_pages

    packed = set()
    for site in find_ffn_sites(model):
        params = site.handler.weight_params(site.module)
        if pack_huge_pages(params):
            packed |= {id(p) for p in params}
    for p in model.parameters():
        if id(p) not in packed:
            to_huge_pages(p)


def _stats(model, name):
    """The CLI's cached NPS statistics if present (A-GLASS), else None (GRIFFIN: same decode cost)."""
    from glass_kernels.cli import stats_cache_path
    from glass_kernels.stats import GlobalStats

    p = stats_cache_path(model, name)
    return GlobalStats.load(p, model=model) if p.exists() else None


class _Patched:
    """Context: the model patched at ``keep`` (A-GLASS with cached NPS stats, else GRIFFIN).

    ``unpatch()`` / ``patch()`` switch it off and on inside the context (the paired dense rounds of
    test_decode); the statistics are loaded once, not on every switch.
    """

    def __init__(self, model, name, keep):
        self.model, self.name, self.keep = model, name, keep
        self.method = "dense"
        self.tuning = None
        self.stats = None
        self._stats_loaded = False
        # quantized rows: unpatch leaves the dequantized values, which are not the model the
        # statistics were computed on; the float FFN weights are kept here and put back on unpatch
        self._float_weights = None

    def patch(self):
        import glass_kernels as gk

        if self.keep is None:
            return
        if not self._stats_loaded:
            self.stats, self._stats_loaded = _stats(self.model, self.name), True
            self.method = "a-glass" if self.stats is not None else "griffin"
        if WEIGHTS and self._float_weights is None:
            from glass_kernels.patch.quantized import FloatWeights

            self._float_weights = FloatWeights(self.model)
        gk.patch(self.model, gk.GlassConfig(method=self.method, keep=self.keep, weights=WEIGHTS), stats=self.stats)
        self.tuning = gk.session(self.model).decode_tuning.describe()

    def unpatch(self):
        from glass_kernels.patch import is_patched, unpatch

        if is_patched(self.model):
            unpatch(self.model)
        if self._float_weights is not None:
            self._float_weights.put_back()

    def __enter__(self):
        self.patch()
        return self

    def __exit__(self, *exc):
        self.unpatch()


def _ffn_modules(model):
    from glass_kernels.ffn import find_ffn_sites

    return [s.module for s in find_ffn_sites(model)]


def measure_mlp_share(model, ids, steps: int = 8) -> dict:
    """Share of a dense decode step spent in the FFN modules (hooks around each FFN forward)."""
    acc = {"t": 0.0}
    starts = {}

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        acc["t"] += time.perf_counter() - starts.pop(id(mod))

    mods = _ffn_modules(model)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        pkv = output_cache(out)
        # warm-up step (allocations) outside the measurement
        out = model(nxt, **cache_kwargs(model, pkv), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        hooks = [m.register_forward_pre_hook(pre) for m in mods] + [m.register_forward_hook(post) for m in mods]
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, **cache_kwargs(model, pkv), use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            total = time.perf_counter() - t0
        finally:
            for h in hooks:
                h.remove()
    f = acc["t"] / total
    return {"mlp_share": f, "step_s": total / steps, "mlp_s": acc["t"] / steps}


def amdahl(f: float, keep: float) -> float:
    return 1.0 / ((1.0 - f) + f * keep)


@pytest.fixture(scope="module")
def shares() -> dict:
    return {}


@pytest.mark.quick
@pytest.mark.parametrize("name", MODELS)
def test_mlp_share(benchmark, results, shares, name):
    set_threads(THREADS)
    model, tok, ids = _load(name)
    runs = []
    benchmark.pedantic(lambda: runs.append(measure_mlp_share(model, ids)), rounds=ROUNDS, iterations=1)
    # the median run's share: hooks add a little time to each FFN call, so f is a slight overestimate
    fs = sorted(r["mlp_share"] for r in runs)
    f = fs[len(fs) // 2]
    shares[name] = f
    benchmark.extra_info.update(machine_info())
    benchmark.extra_info.update(kind="mlp_share", model=name, threads=THREADS, dtype="float32", mlp_share=round(f, 4),
                                amdahl={f"{k:g}": round(amdahl(f, k), 3) for k in KEEPS})
    assert 0.0 < f < 1.0


def _share(shares, name):
    if name not in shares:
        model, tok, ids = _load(name)
        shares[name] = measure_mlp_share(model, ids)["mlp_share"]
    return shares[name]


@pytest.mark.quick
@pytest.mark.parametrize("keep", (None,) + KEEPS, ids=lambda k: "dense" if k is None else f"keep{k:g}")
@pytest.mark.parametrize("name", MODELS)
def test_decode(benchmark, results, shares, name, keep):
    import glass_kernels as gk
    from glass_kernels.patch import is_patched

    set_threads(THREADS)
    model, tok, ids = _load(name)
    f = _share(shares, name)
    state = {}
    paired_dense_s = []  # a dense decode right before each patched one: drift hits both alike

    def prefill():
        with torch.inference_mode():
            out = model(ids, use_cache=True)  # prefill (dense; the patched model collects statistics)
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, **cache_kwargs(model, output_cache(out)), use_cache=True)  # selects the neurons
        state["pkv"], state["nxt"] = output_cache(out), out.logits[:, -1:].argmax(-1)

    steps = {"sparse": 0, "all": 0}  # decode forwards of the timed rounds, as the patch counted them

    def decode():
        pkv, nxt = state["pkv"], state["nxt"]
        # counted on the patched rounds only (setup() also times an unpatched twin through here)
        before = gk.session(model).counters() if is_patched(model) else None
        with torch.inference_mode():
            for _ in range(DECODE_TOKENS):
                out = model(nxt, **cache_kwargs(model, pkv), use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
        if before is not None:
            after = gk.session(model).counters()
            steps["sparse"] += after["sparse"] - before["sparse"]
            steps["all"] += DECODE_TOKENS
            steps["kernel_layers"] = gk.session(model).kernel_layers()

    def setup():
        if keep is not None:
            p.unpatch()  # the dense twin of this round
            prefill()
            t0 = time.perf_counter()
            decode()
            paired_dense_s.append(time.perf_counter() - t0)
            p.patch()
        prefill()
        return (), {}

    with _Patched(model, name, keep) as p:
        benchmark.pedantic(decode, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    tps = DECODE_TOKENS / med
    results[(name, "decode", keep)] = med
    info = benchmark.extra_info
    info.update(machine_info())
    info.update(kind="decode", model=name, method=p.method, keep=1.0 if keep is None else keep, threads=THREADS,
                dtype="float32", batch=1, prompt_tokens=int(ids.shape[1]), decode_tokens=DECODE_TOKENS,
                tokens_per_s=round(tps, 2), mlp_share=round(f, 4))
    if keep is not None:
        info["decode_steps"], info["sparse_decode_steps"] = steps["all"], steps["sparse"]
        info["kernel_layers"] = steps.get("kernel_layers")  # [layers running the kernel, layers]
        info["decode_tuning"] = p.tuning
        info["amdahl_ceiling"] = round(amdahl(f, keep), 3)
        info["weights"] = WEIGHTS or "float"
        if WEIGHTS:  # the ceiling if the FFN time shrank with its bytes: keep x (quantized / float bytes)
            from glass_kernels import quant
            from glass_kernels.patch.quantized import wtype_of

            ratio = quant.block_bytes(wtype_of(WEIGHTS)) / (quant.BLOCK * 4)  # vs fp32
            info["amdahl_ceiling_bytes"] = round(amdahl(f, keep * ratio), 3)
        info["ideal_ffn_speedup"] = round(1.0 / keep, 3)
        dense_s = sorted(paired_dense_s[1:])  # the first belongs to the warm-up round
        info["dense_paired_median_s"] = dense_s[len(dense_s) // 2]
        info["speedup"] = round(info["dense_paired_median_s"] / med, 3)


@pytest.mark.parametrize("keep", (None, 0.5), ids=lambda k: "dense" if k is None else f"keep{k:g}")
@pytest.mark.parametrize("name", MODELS)
def test_ttft(benchmark, results, name, keep):
    set_threads(THREADS)
    model, tok, ids = _load(name)
    import glass_kernels as gk

    def first_token():
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            if keep is not None:
                gk.session(model).neurons()  # the selection the first decode step would trigger
        return nxt

    with _Patched(model, name, keep) as p:
        benchmark.pedantic(first_token, rounds=ROUNDS * 2, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    results[(name, "ttft", keep)] = med
    info = benchmark.extra_info
    info.update(machine_info())
    info.update(kind="ttft", model=name, method=p.method, keep=1.0 if keep is None else keep, threads=THREADS,
                dtype="float32", prompt_tokens=int(ids.shape[1]), ttft_ms=round(1e3 * med, 3))
    dense = results.get((name, "ttft", None))
    if keep is not None and dense is not None:
        info["selection_overhead_ms"] = round(1e3 * (med - dense), 3)
        info["ttft_ratio"] = round(med / dense, 3)
