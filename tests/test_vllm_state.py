"""The vLLM plugin's request bookkeeping and per-layer forward, without vLLM (tests/serving_vllm/ runs the
plugin inside vLLM): prompt rows run dense and add to their request's statistic, generated rows run
the sparse kernel with their request's own set, whatever the batch's make-up."""

import pytest
import torch

from glass_kernels import ops
from glass_kernels.patch.config import GlassConfig
from glass_kernels.patch.selection import make_selection
from glass_kernels.vllm_plugin import config as plugin_config
from glass_kernels.vllm_plugin.state import ServedFFN, ServingState, StepEntry

D, d, LAYERS = 40, 24, 2


def _ffns(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(LAYERS):
        gate, up, down_t = (torch.randn(D, d, generator=g) / d ** 0.5 for _ in range(3))

        def dense(x, mask=None, gate=gate, up=up, down_t=down_t):
            h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
            h = h if mask is None else h * mask
            return h, h @ down_t

        out.append(ServedFFN(layer, f"layers.{layer}.mlp", gate, up, down_t, "silu", dense))
    return out


def _state(method="griffin", keep=0.5, record=True, batch_sets="per-request"):
    ffns = _ffns()
    cfg = GlassConfig(method=method, keep=keep)
    k = [cfg.k_for(D)] * LAYERS
    return ServingState(ffns, k, make_selection(cfg, [D] * LAYERS, k, None), "auto", record, batch_sets)


def _run(state, entries, x):
    state.begin_step(entries, "cpu")
    ys = [state.forward(layer, x) for layer in range(LAYERS)]
    state.end_step()
    return ys


def test_chunked_prefill_adds_up_to_the_whole_prompt():
    x = torch.randn(10, d)
    whole, chunked = _state(), _state()
    _run(whole, [StepEntry("a", 0, 10, 10)], x)
    _run(chunked, [StepEntry("a", 0, 4, 10)], x[:4])
    _run(chunked, [StepEntry("a", 4, 6, 10)], x[4:])
    for layer in range(LAYERS):
        h = whole.ffns[layer].dense(x)[0]
        expected = ops.neuron_stats(h.unsqueeze(0))
        torch.testing.assert_close(whole.requests["a"].stats[layer], expected)
        torch.testing.assert_close(chunked.requests["a"].stats[layer], expected, rtol=1e-5, atol=1e-6)


def test_mixed_batch_each_request_uses_its_own_set():
    state = _state()
    pa, pb = torch.randn(7, d), torch.randn(5, d)
    _run(state, [StepEntry("a", 0, 7, 7), StepEntry("b", 0, 5, 5)], torch.cat([pa, pb]))
    # step: a decodes, c prefills 3 prompt tokens, b decodes
    xa, xc, xb = torch.randn(1, d), torch.randn(3, d), torch.randn(1, d)
    x = torch.cat([xa, xc, xb])
    ys = _run(state, [StepEntry("a", 7, 1, 7), StepEntry("c", 0, 3, 3), StepEntry("b", 5, 1, 5)], x)
    for layer, y in enumerate(ys):
        ffn = state.ffns[layer]
        set_a, set_b = state.requests["a"].sets[layer], state.requests["b"].sets[layer]
        assert set_a.shape == (1, D // 2) and not torch.equal(set_a, set_b)
        # griffin: the k largest entries of the request's own prompt statistic
        stat_a = ops.neuron_stats(ffn.dense(pa)[0].unsqueeze(0))
        assert set(set_a[0].tolist()) == set(stat_a[0].topk(D // 2).indices.tolist())
        ref_a = ops.sparse_ffn(xa, ffn.gate, ffn.up, ffn.down_t, set_a[0], "silu")
        ref_b = ops.sparse_ffn(xb, ffn.gate, ffn.up, ffn.down_t, set_b[0], "silu")
        torch.testing.assert_close(y[0:1], ref_a)
        torch.testing.assert_close(y[4:5], ref_b)
        torch.testing.assert_close(y[1:4], ffn.dense(xc)[1])  # c's prompt rows: dense
    assert state.requests["c"].sets == [None] * LAYERS  # still prefilling: no set yet


def test_overlapping_sets_read_their_union_once():
    # two requests with near-identical prompts: near-identical sets, read as one union
    state = _state()
    pa = torch.randn(8, d)
    pb = pa + 0.05 * torch.randn(8, d)
    _run(state, [StepEntry("a", 0, 8, 8), StepEntry("b", 0, 8, 8)], torch.cat([pa, pb]))
    x = torch.randn(2, d)
    ys = _run(state, [StepEntry("a", 8, 1, 8), StepEntry("b", 8, 1, 8)], x)
    for layer, y in enumerate(ys):
        ffn = state.ffns[layer]
        sa, sb = state.requests["a"].sets[layer][0], state.requests["b"].sets[layer][0]
        union = torch.cat([sa, sb]).unique().numel()
        k = D // 2
        assert union + 2 * (union - k) < 2 * k  # so the union path ran (fewer rows than the two sets)
        assert state.rows_read[layer] == union
        for i, own in enumerate((sa, sb)):
            ref = ops.sparse_ffn(x[i:i + 1], ffn.gate, ffn.up, ffn.down_t, own, "silu")
            torch.testing.assert_close(y[i:i + 1], ref, rtol=1e-5, atol=1e-5)


def test_many_rows_run_the_masked_dense_ffn_with_the_same_result():
    # 3 decoding rows x k = 20 > D = 40: one dense pass with each row's set as a mask
    state = _state()
    prompts = [torch.randn(n, d) for n in (4, 6, 5)]
    _run(state, [StepEntry(r, 0, len(p), len(p)) for r, p in zip("abc", prompts)], torch.cat(prompts))
    x = torch.randn(3, d)
    ys = _run(state, [StepEntry(r, len(p), 1, len(p)) for r, p in zip("abc", prompts)], x)
    for layer, y in enumerate(ys):
        ffn = state.ffns[layer]
        for i, r in enumerate("abc"):
            ref = ops.sparse_ffn(x[i:i + 1], ffn.gate, ffn.up, ffn.down_t, state.requests[r].sets[layer][0], "silu")
            torch.testing.assert_close(y[i:i + 1], ref, rtol=1e-5, atol=1e-5)
        assert state.rows_read[layer] == D
    # two rows x 20 = D: still the kernel
    ys = _run(state, [StepEntry(r, len(p) + 1, 1, len(p)) for r, p in zip("ab", prompts)], x[:2])
    assert state.rows_read[0] < D


def test_shared_batch_set_pools_the_decoding_requests():
    state = _state(batch_sets="shared")
    pa, pb = torch.randn(7, d), torch.randn(3, d)
    _run(state, [StepEntry("a", 0, 7, 7), StepEntry("b", 0, 3, 3)], torch.cat([pa, pb]))
    x = torch.randn(2, d)
    ys = _run(state, [StepEntry("a", 7, 1, 7), StepEntry("b", 3, 1, 3)], x)
    for layer, y in enumerate(ys):
        ffn = state.ffns[layer]
        pooled = ops.neuron_stats(ffn.dense(pa)[0].unsqueeze(0)) / 7 + ops.neuron_stats(ffn.dense(pb)[0].unsqueeze(0)) / 3
        shared = pooled[0].topk(D // 2).indices.sort().values.to(torch.int32)
        torch.testing.assert_close(y, ops.sparse_ffn(x, ffn.gate, ffn.up, ffn.down_t, shared, "silu"))
        assert state.rows_read[layer] == D // 2
    # alone, a request decodes with its own set, as in per-request mode
    solo = _run(state, [StepEntry("a", 8, 1, 7)], x[:1])
    own = state.requests["a"].sets[0][0]
    torch.testing.assert_close(solo[0], ops.sparse_ffn(x[:1], state.ffns[0].gate, state.ffns[0].up,
                                                       state.ffns[0].down_t, own, "silu"))


def test_recompute_after_preemption_rebuilds_the_same_set():
    state = _state()
    prompt = torch.randn(6, d)
    _run(state, [StepEntry("a", 0, 6, 6)], prompt)
    _run(state, [StepEntry("a", 6, 1, 6)], torch.randn(1, d))
    first = [s.clone() for s in state.requests["a"].sets]
    state.release(["a"], finished=False)
    assert "a" not in state.requests and not state.finished  # preempted: not recorded
    # recomputed: prompt + the generated token in one prefill step, the generated row sparse
    gen = torch.randn(1, d)
    ys = _run(state, [StepEntry("a", 0, 7, 6)], torch.cat([prompt, gen]))
    for layer in range(LAYERS):
        assert torch.equal(state.requests["a"].sets[layer], first[layer])
        ffn = state.ffns[layer]
        torch.testing.assert_close(ys[layer][6:], ops.sparse_ffn(gen, ffn.gate, ffn.up, ffn.down_t, first[layer][0]))
    state.release(["a"], finished=True)
    assert state.finished["a"]["prompt_tokens"] == 6 and torch.equal(state.finished["a"]["sets"][0], first[0])


def test_a_request_that_skipped_its_prompt_is_refused():
    state = _state()
    state.begin_step([StepEntry("a", 0, 3, 3)], "cpu")
    state.end_step()
    with pytest.raises(RuntimeError, match="prefix caching"):
        state.begin_step([StepEntry("z", 16, 4, 40)], "cpu")


def test_no_plan_is_the_dense_ffn():
    state = _state()
    x = torch.randn(5, d)
    torch.testing.assert_close(state.forward(0, x), state.ffns[0].dense(x)[1])


def test_fixed_sets_need_no_statistics():
    state = _state(method="random")
    _run(state, [StepEntry("a", 0, 2, 2)], torch.randn(2, d))
    _run(state, [StepEntry("a", 2, 1, 2)], torch.randn(1, d))
    assert state.requests["a"].sets[0].shape == (1, D // 2)


def test_config_parse_names_the_problem():
    cfg = plugin_config.parse({"method": "griffin", "keep": 0.4})
    assert cfg.glass.keep == 0.4 and cfg.stats_path is None and not cfg.dense
    assert plugin_config.parse({"keep": 1.0}).dense
    with pytest.raises(ValueError, match="unknown key"):
        plugin_config.parse({"keep": 0.5, "layout": "bundled"})
    with pytest.raises(ValueError, match="stats"):
        plugin_config.parse({"method": "a-glass", "keep": 0.5})
    with pytest.raises(ValueError, match="keep"):
        plugin_config.parse({"method": "griffin", "keep": 1.5})
    with pytest.raises(TypeError, match="record_sets"):
        plugin_config.parse({"method": "griffin", "record_sets": "yes"})
    with pytest.raises(ValueError, match="batch_sets"):
        plugin_config.parse({"method": "griffin", "batch_sets": "union"})
    assert plugin_config.parse({"method": "griffin", "batch_sets": "shared"}).batch_sets == "shared"
    with pytest.raises(ValueError, match="tp_selection"):
        plugin_config.parse({"method": "griffin", "tp_selection": "random"})
    with pytest.raises(ValueError, match="per-shard"):
        plugin_config.parse({"method": "random", "tp_selection": "per-shard"})
    assert plugin_config.parse({"method": "griffin", "tp_selection": "per-shard"}).tp_selection == "per-shard"
    with pytest.raises(TypeError, match="JSON object"):
        plugin_config.parse("keep=0.5")


def test_masked_crossover_is_measured_on_this_selection():
    state = _state()
    got = state.measure_masked_crossover(rows=(2, 4), reps=1)
    assert got in (None, 2, 4)


def test_engine_settings_that_hide_prompt_tokens_are_refused():
    from types import SimpleNamespace as NS

    def cfg(**kw):
        base = dict(additional_config={"glass": {"method": "griffin", "keep": 0.5}},
                    cache_config=NS(enable_prefix_caching=False), speculative_config=None, lora_config=None,
                    parallel_config=NS(tensor_parallel_size=2, pipeline_parallel_size=1),
                    model_config=NS(quantization=None))
        base.update(kw)
        return NS(**base)

    assert plugin_config.from_vllm(cfg(additional_config={})) is None  # no "glass" key: the plugin is off
    assert plugin_config.from_vllm(cfg()).glass.keep == 0.5  # tensor parallel is fine
    for bad, words in [(dict(cache_config=NS(enable_prefix_caching=True)), "prefix caching"),
                       (dict(speculative_config=object()), "speculative"),
                       (dict(lora_config=object()), "LoRA"),
                       (dict(parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=2)), "pipeline"),
                       (dict(model_config=NS(quantization="gptq")), "quantization")]:
        with pytest.raises(ValueError, match=words):
            plugin_config.from_vllm(cfg(**bad))
    # keep 1.0 leaves vLLM untouched, so nothing needs refusing
    assert plugin_config.from_vllm(cfg(additional_config={"glass": {"keep": 1.0}},
                                       cache_config=NS(enable_prefix_caching=True))).dense


def test_crossover_timing_alternates_and_drops_the_warm_up_round():
    from glass_kernels.tuning import interleaved_median_s

    calls, now = [], [0.0]
    costs = {"kernel": [9.0, 1.0, 3.0, 2.0], "dense": [8.0, 5.0, 4.0, 6.0]}  # first round: warm-up

    def fn(name):
        def run():
            calls.append(name)
            now[0] += costs[name][sum(c == name for c in calls) - 1]
        return run

    got = interleaved_median_s([fn("kernel"), fn("dense")], rounds=3, clock=lambda: now[0])
    assert calls == ["kernel", "dense"] * 4
    assert got == [2.0, 5.0]  # medians of rounds 2-4 only
