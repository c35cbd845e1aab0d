"""Promises that only show under abuse: corrupted statistics files, concurrent use of patched models,
and long runs (issue 14). Each test states its counts; none asserts a timing."""

from __future__ import annotations

import gc
import json
import os
import random
import threading

import pytest
import torch

import tiny_models as tm
from glass_kernels.patch import patch, session, unpatch
from glass_kernels.stats import GlobalStats, StatsFileError, StatsMismatchError

MUTATIONS = 300


# -- statistics files --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    """A real statistics file: calibrated (NPS) on a tiny model, saved by GlobalStats.save."""
    from glass_kernels.calibrate import calibrate

    model = tm.build("llama")

    class Tok:  # BOS-only NPS prompts need nothing but the ids
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
        chat_template = None

    stats = calibrate(model, Tok(), "nps", num_sequences=2, seq_len=8, batch_size=2, progress=False)
    path = tmp_path_factory.mktemp("stats") / "tiny.safetensors"
    stats.save(path)
    return path, model


def _same(a: GlobalStats, b: GlobalStats) -> bool:
    return (a.meta == b.meta and a.num_tokens == b.num_tokens
            and all(torch.equal(x, y) for x, y in zip(a.activation, b.activation))
            and all(torch.equal(x, y) for x, y in zip(a.impact, b.impact)))


def _load_or_error(path, model):
    """None when the load raised the documented error, else the loaded statistics."""
    try:
        return GlobalStats.load(path, model=model)
    except (StatsFileError, StatsMismatchError):
        return None


def test_every_truncation_is_rejected(stats_file, tmp_path):
    path, model = stats_file
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    for n in range(len(data)):  # every length short of the whole file
        bad.write_bytes(data[:n])
        assert _load_or_error(bad, model) is None, f"a file cut to {n} of {len(data)} bytes loaded"


def test_random_byte_corruption_is_rejected_or_harmless(stats_file, tmp_path):
    path, model = stats_file
    data = path.read_bytes()
    original = GlobalStats.load(path)
    rng = random.Random(14)
    bad = tmp_path / "mutated.safetensors"
    rejected = 0
    for _ in range(MUTATIONS):
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 8))):
            i = rng.randrange(len(b))
            b[i] = (b[i] + rng.randrange(1, 256)) % 256  # always a different byte
        bad.write_bytes(bytes(b))
        got = _load_or_error(bad, model)
        if got is None:
            rejected += 1
        else:  # only a change the format ignores (e.g. header padding) may load: same content
            assert _same(got, original), "a corrupted file loaded with different contents"
    assert rejected >= 0.9 * MUTATIONS


def test_files_of_another_model_and_lying_metadata(stats_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, model = stats_file
    with pytest.raises(StatsMismatchError):
        GlobalStats.load(path, model=tm.build("llama", seed=5))  # same shapes, other weights
    with pytest.raises(StatsMismatchError):
        GlobalStats.load(path, model=tm.build("qwen2"))
    with safe_open(path, framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header.pop("checksum")  # as a hand-edited (or older) file would be: no checksum to catch it
    for key, lie in (("D", [tm.D_FF + 1] * tm.LAYERS), ("D", [tm.D_FF]), ("num_layers", 7)):
        edited = dict(header, **{key: json.dumps(lie)})
        bad = tmp_path / f"lie-{key}.safetensors"
        save_file(tensors, bad, metadata=edited)
        assert _load_or_error(bad, model) is None, f"metadata {key}={lie} was believed"


# -- concurrency ---------------------------------------------------------------------------------

def _generate(model, seed, n=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tm.VOCAB, (1, 5), generator=g)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


def test_two_patched_models_in_two_threads_match_sequential():
    models = [tm.build("llama", seed=1), tm.build("gemma3", seed=2)]
    for m in models:
        patch(m, method="griffin", keep=0.5, tune=False)
    want = [_generate(m, seed=i) for i, m in enumerate(models)]
    for _ in range(3):
        got = [None, None]

        def run(i):
            for _ in range(4):
                got[i] = _generate(models[i], seed=i)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    for m in models:
        unpatch(m)


def test_one_patched_model_from_two_threads_works_or_raises():
    """Never silently wrong: every generate() that returns gives the tokens it gives alone."""
    model = tm.build("qwen2", seed=3)
    patch(model, method="griffin", keep=0.5, tune=False)
    want = {s: _generate(model, seed=s) for s in (10, 11)}
    results, errors = [], []
    barrier = threading.Barrier(2)

    def run(seed):
        barrier.wait()
        for _ in range(6):
            try:
                results.append((seed, _generate(model, seed=seed)))
            except RuntimeError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=run, args=(s,)) for s in (10, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(out, want[s]) for s, out in results)
    assert all("two threads" in e for e in errors), errors
    assert len(results) + len(errors) == 12


def test_another_threads_prompt_does_not_turn_decode_steps_into_prompt():
    """The generate() / prefill / session.prompt() depths belong to the thread that entered them: a
    second thread inside session.prompt() (or generate()'s prefill) between its forwards must not make
    this thread's decode steps count as prompt (they would then run dense and pollute the statistics)."""
    model = tm.build("qwen2", seed=3)
    patch(model, method="griffin", keep=0.5, tune=False)
    want = _generate(model, seed=10)
    entered, leave = threading.Event(), threading.Event()

    def hold_prompt_context():
        with session(model).prompt():
            entered.set()
            leave.wait(timeout=60)

    other = threading.Thread(target=hold_prompt_context)
    other.start()
    try:
        assert entered.wait(timeout=60)
        before = session(model).counters()
        got = _generate(model, seed=10)
        sparse_steps = session(model).counters()["sparse"] - before["sparse"]
    finally:
        leave.set()
        other.join()
    assert torch.equal(got, want)
    assert sparse_steps == 7  # 8 new tokens: the prompt forward, then 7 sparse decode steps


def test_thread_count_changes_between_calls():
    model = tm.build("mistral", seed=4)
    patch(model, method="griffin", keep=0.5, tune=False)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1, 3):
            torch.set_num_threads(n)
            outs.append(_generate(model, seed=7))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)


# -- long runs -------------------------------------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_patch_unpatch_cycles_leave_memory_flat_and_weights_identical():
    model = tm.build("llama", seed=6, intermediate_size=1024, hidden_size=256)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8]])
    for _ in range(10):  # warm-up: allocator pools, lazy imports
        patch(model, method="griffin", keep=0.5, tune=False)
        _generate(model, seed=1, n=3)
        unpatch(model)
    gc.collect()
    start = _rss_mib()
    for _ in range(100):
        patch(model, method="griffin", keep=0.5, tune=False)
        with torch.no_grad():
            model(ids, use_cache=True)
        unpatch(model)
    gc.collect()
    grown = _rss_mib() - start
    assert grown < 8, f"RSS grew by {grown:.1f} MiB over 100 patch/unpatch cycles"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) and state[k].stride() == v.stride() for k, v in original.items())


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_long_generation_keeps_memory_flat():
    model = tm.build("llama", seed=8, max_position_embeddings=2200)
    patch(model, method="griffin", keep=0.5, tune=False)
    _generate(model, seed=2, n=200)  # warm-up
    gc.collect()
    start = _rss_mib()
    out = _generate(model, seed=2, n=2000)
    gc.collect()
    grown = _rss_mib() - start
    c = session(model).counters()
    assert out.shape[1] == 5 + 2000 and c["dense"] == 0
    # the KV cache of 2,000 tokens is the only state that grows with length: 2 layers x (K + V) x
    # 2 KV heads x 10 dims x fp32 = 320 B per token, 0.6 MiB; anything much beyond it is a leak
    assert grown < 8, f"RSS grew by {grown:.1f} MiB over a 2,000-token generation"
    unpatch(model)
