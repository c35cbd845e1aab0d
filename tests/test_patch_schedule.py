"""The GLASS schedule on patched tiny models: selection rules, chunked and padded prompts,
generate() (greedy, sampling, beam search), explicit sets, torch.compile."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from glass_kernels.hf_compat import cache_kwargs, output_cache
from glass_kernels.patch import patch, session, unpatch

K = int(0.5 * tm.D_FF)


def _ids(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, tm.VOCAB, (B, T), generator=g)


def _prompt(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=True, **kw)


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3", "opt", "gpt2"])
def test_lambda_zero_is_griffin(family):
    model = tm.build(family)
    ids = _ids(5, 3, 9)
    ref_sets, ref_stats = tm.griffin_reference(model, ids, [K] * tm.LAYERS)
    stats = tm.random_stats(model)
    for kw in (dict(method="a-glass", lam=0.0, stats=stats), dict(method="griffin")):
        patch(model, keep=0.5, **kw)
        _prompt(model, ids)
        s = session(model)
        assert s.phase == "prompt"
        for got, ref in zip(s.local_stats(), ref_stats):
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
        for got, ref in zip(s.neurons(), ref_sets):
            assert torch.equal(got, ref)
        assert s.phase == "decode"
        unpatch(model)


@pytest.mark.parametrize("method", ["a-glass", "i-glass"])
@pytest.mark.parametrize("lam", [0.3, 0.75])
def test_glass_aggregation(method, lam):
    model = tm.build("qwen3")
    ids = _ids(6, 2, 8)
    _, local = tm.griffin_reference(model, ids, [K] * tm.LAYERS, impact=(method == "i-glass"))
    stats = tm.random_stats(model, seed=3)
    ranks = stats.ranks("impact" if method == "i-glass" else "activation")
    patch(model, stats=stats, method=method, lam=lam, keep=0.5)
    _prompt(model, ids)
    for l, got in enumerate(session(model).neurons()):
        assert torch.equal(got, tm.aggregate_reference(local[l], ranks[l], lam, K))


def test_global_random_dense_methods():
    model = tm.build("llama")
    stats = tm.random_stats(model)
    ids = _ids(7, 2, 6)
    patch(model, stats=stats, method="global", keep=0.5)
    _prompt(model, ids)
    for got, r in zip(session(model).neurons(), stats.ranks("activation")):
        want = torch.nonzero(r <= K).flatten().to(torch.int32)  # the K best global ranks
        assert got.shape == (1, K) and torch.equal(got[0], want)
    unpatch(model)

    def random_sets(seed):
        patch(model, method="random", keep=0.5, seed=seed)
        _prompt(model, ids)
        s = session(model).neurons()
        unpatch(model)
        return s

    a, b, c = random_sets(0), random_sets(0), random_sets(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    assert all(x.shape == (1, K) and bool((x[0, 1:] > x[0, :-1]).all()) for x in a)

    dense_logits = torch.cat([_prompt(model, ids).logits], 1)
    out = _prompt(model, ids)
    with torch.no_grad():
        nxt = model(_ids(8, 2, 2), **cache_kwargs(model, output_cache(out))).logits
    patch(model, method="dense")
    out2 = _prompt(model, ids)
    with torch.no_grad():
        nxt2 = model(_ids(8, 2, 2), **cache_kwargs(model, output_cache(out2))).logits
    assert torch.equal(out2.logits, dense_logits) and torch.equal(nxt2, nxt)
    assert session(model).phase == "decode"
    assert len(session(model).local_stats()) == tm.LAYERS  # statistics still collected
    with pytest.raises(RuntimeError, match="dense"):
        session(model).neurons()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_chunked_prompt_equals_one_shot(family):
    ids, nxt = _ids(9, 2, 10), _ids(10, 2, 2)
    model = tm.build(family)
    patch(model, method="griffin", keep=0.5)
    one = _prompt(model, ids)
    stats1 = session(model).local_stats()
    with torch.no_grad():
        y1 = model(nxt, **cache_kwargs(model, output_cache(one))).logits
    sets1 = session(model).neurons()

    a = _prompt(model, ids[:, :4])  # new sequence
    with session(model).prompt():
        with torch.no_grad():
            b = model(ids[:, 4:7], **cache_kwargs(model, output_cache(a)), use_cache=True)
            b = model(ids[:, 7:], **cache_kwargs(model, output_cache(b)), use_cache=True)
    assert session(model).phase == "prompt"
    for x, y in zip(session(model).local_stats(), stats1):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y2 = model(nxt, **cache_kwargs(model, output_cache(b))).logits
    assert all(torch.equal(x, y) for x, y in zip(session(model).neurons(), sets1))
    # torch's own chunked-vs-one-shot difference (dense model, same inputs) sets the tolerance
    unpatch(model)
    with torch.no_grad():
        d1 = model(nxt, **cache_kwargs(model, output_cache(model(ids, use_cache=True)))).logits
        c = output_cache(model(ids[:, :4], use_cache=True))
        c = output_cache(model(ids[:, 4:7], **cache_kwargs(model, c), use_cache=True))
        c = output_cache(model(ids[:, 7:], **cache_kwargs(model, c), use_cache=True))
        d2 = model(nxt, **cache_kwargs(model, c)).logits
    err_torch = (d2 - d1).abs().max().item()
    eps = 4 * torch.finfo(torch.float32).eps * d1.abs().max().item()
    assert (y2 - y1).abs().max().item() <= 2 * err_torch + eps


def _left_pad(seqs):
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return ids, mask


def _gen(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "opt", "gpt2"])
def test_left_padded_batch_equals_one_by_one(family):
    seqs = [_ids(s, 1, n)[0].tolist() for s, n in ((11, 5), (12, 8), (13, 3))]
    ids, mask = _left_pad(seqs)
    model = tm.build(family)

    def run_all():
        batch = _gen(model, ids, mask)
        singles = [_gen(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs]
        return batch, singles

    # torch's own padded-vs-alone difference on the dense model sets the tolerance
    dense_b, dense_s = run_all()
    err_dense = max((torch.stack(dense_b.logits)[:, i] - torch.stack(s.logits)[:, 0]).abs().max().item()
                    for i, s in enumerate(dense_s))
    patch(model, method="griffin", keep=0.5)
    batch = _gen(model, ids, mask)
    sets_b = session(model).neurons()
    T = ids.shape[1]
    for i, s in enumerate(seqs):
        single = _gen(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
        for l, sb in enumerate(session(model).neurons()):
            assert torch.equal(sets_b[l][i], sb[0]), (family, i, l)
        assert batch.sequences[i, T:].tolist() == single.sequences[0, len(s):].tolist()
        err = (torch.stack(batch.logits)[:, i] - torch.stack(single.logits)[:, 0]).abs().max().item()
        eps = 4 * torch.finfo(torch.float32).eps * torch.stack(single.logits).abs().max().item()
        assert err <= 2 * err_dense + eps, (family, i, err, err_dense)


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3", "opt", "gpt2"])
def test_generate_greedy_sampling_beam(family):
    ids, mask = _left_pad([_ids(14, 1, 6)[0].tolist(), _ids(15, 1, 4)[0].tolist()])
    model = tm.build(family)
    modes = {
        "greedy": dict(do_sample=False),
        "sample": dict(do_sample=True, top_k=0, num_return_sequences=2),
        "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    }
    stats = tm.random_stats(model)
    for name, kw in modes.items():
        patch(model, stats=stats, method="a-glass", keep=0.5)
        torch.manual_seed(0)
        with torch.no_grad():
            got = model.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, **kw)
        sets = session(model).neurons()
        rows = ids.shape[0] * kw.get("num_beams", kw.get("num_return_sequences", 1))
        assert all(s.shape == (rows, K) for s in sets), name
        # rows expanded from one prompt share one set; the two prompts differ
        per = rows // 2
        for s in sets:
            assert all(torch.equal(s[r], s[(r // per) * per]) for r in range(rows))
        assert not torch.equal(sets[0][0], sets[0][per])
        unpatch(model)
        with tm.NeuronMask(model, sets, auto=True):
            torch.manual_seed(0)
            with torch.no_grad():
                want = model.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, **kw)
        assert torch.equal(got, want), (family, name)


def _masked_next(model, sets, ids, nxt, expand=None):
    """Plain-torch reference: dense prompt, then the next tokens with h masked to ``sets``."""
    with tm.NeuronMask(model, sets) as nm:
        with torch.no_grad():
            o = model(ids, use_cache=True)
            if expand:
                output_cache(o).batch_repeat_interleave(expand)
            nm.active = True
            return model(nxt, **cache_kwargs(model, output_cache(o))).logits


def test_set_neurons_and_new_sequence():
    model = tm.build("mistral")
    ids, nxt = _ids(16, 2, 5), _ids(17, 2, 2)
    patch(model, method="griffin", keep=0.5)
    s = session(model)
    out = _prompt(model, ids)
    g = torch.Generator().manual_seed(0)
    forced = [torch.randperm(tm.D_FF, generator=g)[:30].sort().values for _ in range(tm.LAYERS)]
    s.set_neurons(forced)  # [k] -> shared by both rows
    assert s.phase == "decode"
    with torch.no_grad():
        got = model(nxt, **cache_kwargs(model, output_cache(out))).logits
    assert all(torch.equal(a[0], b.to(torch.int32)) for a, b in zip(s.neurons(), forced))
    # a new sequence starts over: the prompt's own sets again
    _prompt(model, ids)
    assert s.phase == "prompt"
    own = s.neurons()
    assert not torch.equal(own[0][0, :30], forced[0].to(torch.int32))
    unpatch(model)
    want = _masked_next(model, forced, ids, nxt)
    oracle = _masked_next(tm.build("mistral", dtype=torch.float64), forced, ids, nxt)
    tm.assert_close_to_oracle(got, want, oracle, "set_neurons")

    patch(model, method="griffin", keep=0.5)
    s = session(model)
    _prompt(model, ids)
    with pytest.raises(ValueError, match="one tensor per FFN layer"):
        s.set_neurons(forced[:1])
    with pytest.raises(IndexError, match="outside"):
        s.set_neurons([torch.tensor([0, tm.D_FF])] * tm.LAYERS)
    with pytest.raises(ValueError, match="rows"):
        s.set_neurons([torch.zeros(3, 4, dtype=torch.int32)] * tm.LAYERS)
    with pytest.raises(TypeError, match="int32/int64"):
        s.set_neurons([torch.zeros(4)] * tm.LAYERS)


def test_set_neurons_before_any_prompt_takes_the_batch_from_any_layer():
    """Sets forced on a fresh patch: a shared [1, k] set in the first layer does not make the batch 1
    (which would repeat the other layers' [B, k] sets B times); mixed row counts are refused."""
    model = tm.build("llama")
    ids, nxt = _ids(16, 3, 5), _ids(17, 3, 2)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    g = torch.Generator().manual_seed(1)
    per_row = [torch.stack([torch.randperm(tm.D_FF, generator=g)[:20].sort().values for _ in range(3)])
               for _ in range(tm.LAYERS - 1)]
    forced = [torch.arange(tm.D_FF)[None]] + per_row
    patch(model, method="griffin", keep=0.5)
    s = session(model)
    s.set_neurons(forced)
    with torch.no_grad():
        model(nxt, **cache_kwargs(model, output_cache(out)))
    assert [t.shape[0] for t in s.neurons()] == [1] + [3] * (tm.LAYERS - 1)
    unpatch(model)
    patch(model, method="griffin", keep=0.5)
    s = session(model)
    with pytest.raises(ValueError, match="row counts"):
        s.set_neurons([torch.zeros(2, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32)]
                      + [torch.zeros(1, 4, dtype=torch.int32)] * (tm.LAYERS - 2))
    unpatch(model)


def test_forward_without_cache_is_dense_and_reset():
    model = tm.build("qwen2")
    ids = _ids(18, 2, 6)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    patch(model, method="griffin", keep=0.25)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    assert torch.equal(got, ref)
    s = session(model)
    assert s.phase == "prompt"
    s.reset()
    assert s.phase == "idle"
    with pytest.raises(RuntimeError, match="no prompt"):
        s.local_stats()
    # a decode forward with no prompt seen by the patched model: a clear error for griffin
    unpatch(model)
    out = _prompt(model, ids)
    patch(model, method="griffin", keep=0.25)
    with pytest.raises(RuntimeError, match="needs the prompt's statistics"):
        with torch.no_grad():
            model(ids[:, :1], **cache_kwargs(model, output_cache(out)))


def test_batch_mismatch_is_an_error():
    model = tm.build("llama")
    patch(model, method="griffin", keep=0.5)
    out = _prompt(model, _ids(19, 2, 5))
    cache = output_cache(out)
    with pytest.raises(RuntimeError, match="batch 1"):
        with torch.no_grad():
            model(_ids(20, 1, 1), **cache_kwargs(model, cache))


def test_memory_overhead_reported():
    model = tm.build("llama")
    stats = tm.random_stats(model)
    patch(model, stats=stats, method="i-glass", keep=0.5)
    _prompt(model, _ids(21, 2, 5))
    session(model).neurons()
    mem = session(model).memory_overhead()
    L, D = tm.LAYERS, tm.D_FF
    assert mem["global_ranks"] == L * D * 4 and mem["down_norms"] == L * D * 4
    assert mem["local_stats"] == L * 2 * D * 4 and mem["neuron_sets"] == L * 2 * K * 4
    assert mem["total"] == sum(v for n, v in mem.items() if n != "total")


def test_torch_compile_decode_step():
    from glass_kernels import ops

    model = tm.build("llama")
    patch(model, method="griffin", keep=0.5)
    out = _prompt(model, _ids(22, 1, 6))
    with torch.no_grad():  # one decode forward: the FFNs are now in their sparse state
        model(_ids(28, 1, 1), **cache_kwargs(model, output_cache(out)))
    mlp = model.model.layers[0].mlp
    w = mlp.site.handler.weights(mlp.site.module)
    idx = session(model).neurons()[0]
    x = torch.randn(1, 1, tm.D_MODEL)
    with torch.no_grad():
        eager = mlp(x)
        want = ops.sparse_ffn(x, *w, idx, "silu")
        compiled = torch.compile(mlp, fullgraph=True, dynamic=False)(x)
    assert torch.equal(eager, want)  # the decode step is the sparse op
    # the compiled graph calls the registered glass::sparse_ffn op: the same deterministic kernel
    assert torch.equal(compiled, eager)



def test_generate_chunked_prefill_and_continued_cache():
    ids, mask = _left_pad([_ids(23, 1, 9)[0].tolist(), _ids(24, 1, 6)[0].tolist()])
    model = tm.build("llama")
    patch(model, method="griffin", keep=0.5)
    from transformers import DynamicCache

    with torch.no_grad():
        one = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        sets_one = session(model).neurons()
        # an explicit cache: transformers 5.0 to (at least) 5.12 refuse chunked prefill without one
        chunked = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 prefill_chunk_size=4, **cache_kwargs(model, DynamicCache(config=model.config)))
    assert all(torch.equal(a, b) for a, b in zip(session(model).neurons(), sets_one))
    assert torch.equal(chunked, one)
    assert "_prefill" in model.__dict__
    unpatch(model)
    assert "_prefill" not in model.__dict__

    # a second turn on the same cache: its new prompt tokens add to the statistics
    patch(model, method="griffin", keep=0.5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model.generate(ids, attention_mask=mask, max_new_tokens=3, **cache_kwargs(model, cache),
                               return_dict_in_generate=True)
        stats_first = session(model).local_stats()
        turn = torch.cat([first.sequences, _ids(25, 2, 3)], dim=1)
        turn_mask = torch.cat([mask, torch.ones(2, turn.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        model.generate(turn, attention_mask=turn_mask, max_new_tokens=2, **cache_kwargs(model, output_cache(first)))
    assert session(model).phase == "decode"
    grown = [b.sum(1) - a.sum(1) for a, b in zip(stats_first, session(model).local_stats())]
    # each prompt token adds exactly 1 to sum_i (h_i / ||h||)^2; the second prefill feeds what the
    # cache lacks: the first turn's last generated token and the 3 new ones
    fed = turn.shape[1] - (first.sequences.shape[1] - 1)
    for g in grown:
        torch.testing.assert_close(g, torch.full((2,), float(fed)), rtol=1e-4, atol=1e-4)


def test_cache_expanded_after_prompt():
    """Prefill once, then sample several continuations per prompt from an expanded cache."""
    model = tm.build("qwen2")
    ids, nxt = _ids(26, 2, 6), _ids(27, 6, 1)
    patch(model, method="griffin", keep=0.5)
    out = _prompt(model, ids)
    sets = session(model).neurons()
    output_cache(out).batch_repeat_interleave(3)
    with torch.no_grad():
        got = model(nxt, **cache_kwargs(model, output_cache(out))).logits
    expanded = session(model).neurons()
    assert all(torch.equal(e, s.repeat_interleave(3, dim=0)) for e, s in zip(expanded, sets))
    unpatch(model)
    want = _masked_next(model, expanded, ids, nxt, expand=3)
    oracle = _masked_next(tm.build("qwen2", dtype=torch.float64), expanded, ids, nxt, expand=3)
    tm.assert_close_to_oracle(got, want, oracle, "expanded cache")
