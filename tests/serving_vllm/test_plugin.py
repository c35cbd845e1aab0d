"""The vLLM plugin inside vLLM's CPU backend (run in .venv-vllm: scripts/setup_vllm.sh, scripts/ci_vllm.sh).

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor) so a test can read
the plugin's state; test_server runs `vllm serve` as users do, with vLLM's own processes.
Reference: ``glass_kernels.patch`` on the same weights in Hugging Face transformers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM plugin tests run in .venv-vllm (scripts/setup_vllm.sh)")

import torch  # noqa: E402

import glass_kernels  # noqa: E402
from glass_kernels.vllm_plugin import glass_state, hooks, request_sets  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tiny_models as tm  # noqa: E402

# vLLM's CPU attention needs a head size it has kernels for (32 here); odd FFN width on purpose.
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=200,
            max_position_embeddings=512)
PROMPTS = [[5, 17, 33, 8, 61, 2 + 1, 40], [70, 12, 9, 88, 31], list(range(10, 60, 3))]
NEW_TOKENS = 12


@pytest.fixture(autouse=True, scope="module")
def _in_process_engines():
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _save_tiny(tmp_path, family):
    model = tm.build(family, **TINY, **({"head_dim": 32} if family in ("qwen3", "gemma3") else {}))
    folder = tmp_path / family
    model.save_pretrained(folder, safe_serialization=True)
    return model, str(folder)


@contextlib.contextmanager
def _engine(folder, glass=None, **kw):
    """An in-process LLM, shut down (and its process groups destroyed) before the next one starts."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    args = dict(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, enable_prefix_caching=False,
                distributed_executor_backend="uni", max_num_seqs=8, skip_tokenizer_init=True, seed=0)
    args.update(kw)
    if glass is not None:
        args["additional_config"] = {"glass": glass}
    llm = LLM(**args)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def _generate(llm, prompts=PROMPTS, n=NEW_TOKENS):
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False))
    return [list(o.outputs[0].token_ids) for o in outs]


def _finished_sets(llm):
    """LLM request id -> per-layer set tensors of the requests the engine served (record_sets).

    The engine's ids are the LLM's ids with a suffix ("0-1a2b3c4d")."""
    sets = llm.apply_model(lambda m: glass_state(m).request_sets())[0]
    return {r.split("-")[0]: v for r, v in sets.items()}


def _hf_tokens(model, prompt, n=NEW_TOKENS):
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def test_hook_targets_exist():
    # the private vLLM functions the plugin wraps: a vLLM release that moves one fails here first
    for cls, name in hooks.targets():
        assert callable(cls.__dict__.get(name)), f"{cls.__name__}.{name} is gone"
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert list(inspect.signature(GPUModelRunner._prepare_inputs).parameters)[:3] == [
        "self", "scheduler_output", "num_scheduled_tokens"]


def test_keep_1_is_stock_vllm(tmp_path):
    _, folder = _save_tiny(tmp_path, "llama")
    with _engine(folder) as llm:
        stock = _generate(llm)
        assert llm.apply_model(glass_state) == [None]
    with _engine(folder, {"method": "griffin", "keep": 1.0}) as llm:
        assert _generate(llm) == stock
        assert llm.apply_model(glass_state) == [None]  # keep 1.0: vLLM's model untouched


@pytest.mark.parametrize("family,method", [(f, m) for f in ("llama", "qwen3", "gemma3") for m in ("griffin", "a-glass")]
                         + [("mistral", "a-glass"), ("qwen2", "a-glass"), ("llama", "i-glass"),
                            ("llama", "global"), ("llama", "random")])
def test_same_tokens_and_sets_as_the_hf_patch(tmp_path, family, method):
    model, folder = _save_tiny(tmp_path, family)
    glass = {"method": method, "keep": 0.5, "record_sets": True}
    stats = None
    if method in ("a-glass", "i-glass", "global"):
        stats = tm.random_stats(model)
        glass["stats"] = str(tmp_path / "stats.safetensors")
        stats.save(glass["stats"])
    with _engine(folder, glass) as llm:
        tokens = _generate(llm)
        sets = _finished_sets(llm)
    glass_kernels.patch(model, method=method, keep=0.5, stats=stats)
    dense_differs = False
    for i, prompt in enumerate(PROMPTS):
        assert tokens[i] == _hf_tokens(model, prompt), f"prompt {i}"
        hf_sets = glass_kernels.session(model).neurons()
        served = sets[str(i)]
        for layer, (a, b) in enumerate(zip(served, hf_sets)):
            assert torch.equal(a[0].sort().values, b.reshape(-1).cpu().sort().values.to(a.dtype)), (i, layer)
    glass_kernels.unpatch(model)
    for i, prompt in enumerate(PROMPTS):
        dense_differs |= tokens[i] != _hf_tokens(model, prompt)
    assert dense_differs, "keep 0.5 gave the dense model's tokens on every prompt: the test shows nothing"
    if method in ("global", "random"):  # one set per layer for every prompt, by definition
        assert torch.equal(sets["0"][0], sets["1"][0])
    else:  # a batch of different prompts gets different sets
        assert not torch.equal(sets["0"][0], sets["1"][0])


def test_chunked_prefill_and_preemption_give_the_same_sets(tmp_path):
    _, folder = _save_tiny(tmp_path, "llama")
    long_prompts = [list(range(3, 3 + 40)), list(range(90, 45, -1)), [7] * 20 + list(range(30))]
    glass = {"method": "griffin", "keep": 0.4, "record_sets": True}
    with _engine(folder, glass) as llm:
        plain_tokens, plain_sets = _generate(llm, long_prompts, 60), _finished_sets(llm)
    # prompts prefilled 16 tokens per step, and a KV cache too small for all three: vLLM preempts and
    # recomputes requests, whose sets must be rebuilt from the same prompt statistics
    with _engine(folder, glass, max_num_batched_tokens=16, max_model_len=128, num_gpu_blocks_override=5,
                 block_size=32) as llm:
        tokens, sets = _generate(llm, long_prompts, 60), _finished_sets(llm)
        counters = llm.apply_model(lambda m: glass_state(m).summary()["counters"])[0]
    assert tokens == plain_tokens
    for r in plain_sets:
        for a, b in zip(plain_sets[r], sets[r]):
            assert torch.equal(a, b)
    assert counters.get("preempted", 0) + counters.get("restarted", 0) > 0, counters


def test_tensor_parallel_2_decodes_with_one_ranks_sets(tmp_path, monkeypatch):
    """TP 2: each rank holds half of every FFN's neurons; the ranks gather each request's statistics,
    so they keep exactly TP 1's sets between them, and the tokens are TP 1's. (A tiny model only:
    SmolLM2's 9 attention heads do not split over 2 ranks, and vLLM refuses it.)"""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the workers
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallel 2 needs 2 CPUs")
    # one core per rank (vLLM's automatic binding wants one NUMA node per rank)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    model, folder = _save_tiny(tmp_path, "llama")
    path = str(tmp_path / "stats.safetensors")
    tm.random_stats(model).save(path)
    glass = {"method": "a-glass", "keep": 0.5, "stats": path, "record_sets": True}
    with _engine(folder, glass) as llm:
        tokens, sets = _generate(llm), _finished_sets(llm)
    with _engine(folder, glass, tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        tp_tokens = _generate(llm)
        per_rank = [{r.split("-")[0]: v for r, v in rank.items()} for rank in llm.apply_model(request_sets)]
    assert tp_tokens == tokens
    for r, layers in sets.items():
        for layer, whole in enumerate(layers):
            halves = [rank[r][layer].reshape(-1) for rank in per_rank]
            assert all(h.numel() > 0 for h in halves)
            assert torch.equal(torch.cat(halves).sort().values, whole.reshape(-1).sort().values), (r, layer)


def test_tensor_parallel_2_real_model_gemma3(tmp_path, monkeypatch):
    """Gemma-3-270M (4-bit GGUF dequantized to fp32; SmolLM2's 9 heads do not split over 2 ranks):
    GRIFFIN keep 0.5 with TP 2 keeps TP 1's sets between its ranks and gives TP 1's tokens."""
    from glass_kernels.models import load_model, model_cache_dir, prompt_ids

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallel 2 needs 2 CPUs")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    _, tok = load_model("gemma3-270m")
    folder = str(model_cache_dir("gemma3-270m"))
    prompts = [prompt_ids(tok, t, chat=False) for t in ("The three largest rivers of Europe are",
                                                         "A compiler translates")]
    glass = {"method": "griffin", "keep": 0.5, "record_sets": True}
    kw = dict(skip_tokenizer_init=False, max_model_len=256)
    with _engine(folder, glass, **kw) as llm:
        tokens, sets = _generate(llm, prompts, 16), _finished_sets(llm)
    with _engine(folder, glass, tensor_parallel_size=2, distributed_executor_backend="mp", **kw) as llm:
        tp_tokens = _generate(llm, prompts, 16)
        per_rank = [{r.split("-")[0]: v for r, v in rank.items()} for rank in llm.apply_model(request_sets)]
    assert tp_tokens == tokens
    for r, layers in sets.items():
        for layer, whole in enumerate(layers):
            both = torch.cat([rank[r][layer].reshape(-1) for rank in per_rank]).sort().values
            assert torch.equal(both, whole.reshape(-1).sort().values), (r, layer)


def test_tensor_parallel_per_shard_keeps_each_ranks_share(tmp_path, monkeypatch):
    """tp_selection="per-shard": each rank keeps k / 2 of its own neurons, ranked by its share of the
    prompt statistic and the global ranks re-ranked within the shard (no gather)."""
    from glass_kernels import ops

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallel 2 needs 2 CPUs")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    model, folder = _save_tiny(tmp_path, "llama")
    stats = tm.random_stats(model)
    path = str(tmp_path / "stats.safetensors")
    stats.save(path)
    glass = {"method": "a-glass", "keep": 0.5, "stats": path, "record_sets": True, "tp_selection": "per-shard"}
    with _engine(folder, glass, tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        tokens = _generate(llm)
        per_rank = [{r.split("-")[0]: v for r, v in rank.items()} for rank in llm.apply_model(request_sets)]
    glass_kernels.patch(model, method="a-glass", keep=0.5, stats=stats)
    lam = glass_kernels.GlassConfig().lam
    for i, prompt in enumerate(PROMPTS):
        _hf_tokens(model, prompt, 1)  # the prompt pass: its statistics
        local = glass_kernels.session(model).local_stats()
        for layer, (stat, ranks) in enumerate(zip(local, stats.ranks("activation"))):
            D = stat.shape[-1]
            for j, rank in enumerate(per_rank):
                lo, hi = j * D // 2, (j + 1) * D // 2
                shard_ranks = (ranks[lo:hi].argsort().argsort() + 1).to(torch.int32)
                want = ops.select_neurons(stat[:, lo:hi].float().contiguous(), shard_ranks, lam, D // 4)[0] + lo
                assert torch.equal(rank[str(i)][layer].reshape(-1), want.to(torch.int64)), (i, layer, j)
    assert all(len(t) == NEW_TOKENS for t in tokens)


def test_bad_configuration_is_named(tmp_path):
    model, folder = _save_tiny(tmp_path, "llama")
    with pytest.raises(Exception, match="prefix caching"):
        with _engine(folder, {"method": "griffin", "keep": 0.5}, enable_prefix_caching=True):
            pass
    other = tm.build("llama", seed=7, **TINY)
    path = str(tmp_path / "other.safetensors")
    tm.random_stats(other).save(path)
    with pytest.raises(Exception, match="do not belong to this model"):
        with _engine(folder, {"method": "a-glass", "keep": 0.5, "stats": path}):
            pass


def test_real_model_smollm2(tmp_path):
    """SmolLM2-135M-Instruct (4-bit GGUF dequantized to fp32): A-GLASS keep 0.5 in vLLM gives the HF
    patch's tokens with the same statistics, on chat prompts."""
    from glass_kernels.models import load_model, model_cache_dir, prompt_ids

    model, tok = load_model("smollm2")
    stats = glass_kernels.calibrate(model, tok, num_sequences=4, seq_len=48, progress=False)
    path = str(tmp_path / "smollm2.safetensors")
    stats.save(path)
    prompts = [prompt_ids(tok, t, chat=True) for t in (
        "What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is.")]
    with _engine(str(model_cache_dir("smollm2")), {"method": "a-glass", "keep": 0.5, "stats": path},
                 skip_tokenizer_init=False, max_model_len=512) as llm:
        tokens = _generate(llm, prompts, 24)
    glass_kernels.patch(model, method="a-glass", keep=0.5, stats=stats)
    for i, p in enumerate(prompts):
        assert tokens[i] == _hf_tokens(model, p, 24), f"prompt {i}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_with_sparse_decoding(tmp_path):
    """`vllm serve` with the plugin switched on by --additional-config answers an OpenAI completion
    request on localhost with the HF patch's sparse tokens (and not the dense model's)."""
    from glass_kernels.models import load_model, model_cache_dir

    model, folder = _save_tiny(tmp_path, "llama")
    load_model("smollm2")  # makes the tokenizer files the server needs
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_cache_dir("smollm2") / f, folder)
    port = _free_port()
    glass = json.dumps({"glass": {"method": "griffin", "keep": 0.5}})
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        # `vllm serve` itself: vllm-cpu 0.32.0's `vllm` script looks up the distribution "vllm" and fails
        # (PackageNotFoundError); its OpenAI server module is the same server
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1", "--port",
         str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--no-enable-prefix-caching",
         "--additional-config", glass], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(server, port, tmp_path / "server.log")
        prompt = PROMPTS[0]
        body = json.dumps({"model": folder, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    got = answer["choices"][0].get("token_ids")
    dense = _hf_tokens(model, prompt)
    glass_kernels.patch(model, method="griffin", keep=0.5)
    sparse = _hf_tokens(model, prompt)
    assert sparse != dense
    assert got == sparse, answer


def _wait_ready(server, port, log_path, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if server.poll() is not None:
            raise AssertionError("vllm serve exited:\n" + open(log_path).read()[-4000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError("vllm serve did not start in time:\n" + open(log_path).read()[-4000:])
