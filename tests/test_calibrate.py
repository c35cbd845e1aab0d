"""calibrate(): NPS / list-of-strings / file sources on tiny random models, against a hook-based
plain-torch reference of the statistic (fp64 oracle, FlashAttention-style tolerance)."""

import pytest
import torch

import tiny_models
from glass_kernels.calibrate import calibrate, generate_nps, text_chunks
from glass_kernels.patch import find_ffn_sites
from glass_kernels.stats import GlobalStats


class CharTokenizer:
    """Duck-typed tokenizer for the tiny models: one id per character, BOS 1, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % (tiny_models.VOCAB - 3)) for c in text]}


class ChatCharTokenizer(CharTokenizer):
    chat_template = "{{ tiny }}"
    chat_prompt = [1, 7, 8, 9]

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False):
        assert messages == [{"role": "user", "content": ""}] and add_generation_prompt and tokenize
        return {"input_ids": list(self.chat_prompt)} if return_dict else list(self.chat_prompt)


TOK = CharTokenizer()

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "",
    "Pack my box with five dozen liquor jugs!",
    "Sphinx of black quartz, judge my vow; " * 4,
]


def reference_stats(model, ids, mask, dtype, stat_dtype=None):
    """Per-layer (activation, impact) sums over the masked tokens of one dense full forward of the
    model cast to ``dtype``, the statistic computed in plain torch in ``stat_dtype`` (default: dtype).
    The model is cast back to its dtype afterwards."""
    orig = next(model.parameters()).dtype
    stat_dtype = stat_dtype or dtype
    m = model.to(dtype)
    sites = find_ffn_sites(m)
    B, T = ids.shape
    captured = {}
    handles = [
        s.handler.intermediate_module(s.module).register_forward_pre_hook(
            lambda mod, args, l=l, D=s.handler.D: captured.__setitem__(l, args[0].detach().reshape(B, T, D))
        )
        for l, s in enumerate(sites)
    ]
    try:
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    act, imp = [], []
    for l, s in enumerate(sites):
        h = captured[l].to(stat_dtype)
        c = s.handler.down_weight(s.module).detach().to(stat_dtype).norm(dim=0)
        for v, out in ((h, act), (h * c, imp)):
            n = v.norm(dim=-1, keepdim=True)
            q = torch.where(n > 0, (v / n) ** 2, torch.zeros_like(v)) * mask[..., None].to(stat_dtype)
            out.append(q.sum((0, 1)))
    model.to(orig)
    return act, imp


def assert_stats_match(stats, model, ids, mask):
    # torch's own result: the model in its dtype, the statistic in fp32 (docs/method.md: "accumulated
    # in fp32 whatever the model's dtype"); the oracle: everything in fp64.
    dtype = next(model.parameters()).dtype
    ref_a, ref_i = reference_stats(model, ids, mask, dtype, torch.float32)
    ora_a, ora_i = reference_stats(model, ids, mask, torch.float64)
    for kind, got, ref, ora in (("activation", stats.activation, ref_a, ora_a), ("impact", stats.impact, ref_i, ora_i)):
        for l, (g, r, o) in enumerate(zip(got, ref, ora)):
            tiny_models.assert_close_to_oracle(g, r, o, f"{kind} layer {l}")
    assert stats.num_tokens == int(mask.sum())


FAMILIES = ["llama", "gemma3", "phi3", "opt", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_list_matches_reference(family):
    model = tiny_models.build(family)
    stats = calibrate(model, TOK, source=DOCS, seq_len=24, batch_size=3, progress=False)
    ids, mask = text_chunks(TOK, DOCS, 24)
    assert ids.shape[0] > 3 and not bool(mask.all())  # several batches, a padded last piece
    assert_stats_match(stats, model, ids, mask)
    assert stats.meta["source"] == "text" and stats.meta["num_sequences"] == ids.shape[0]
    stats.check_model(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(dtype):
    model = tiny_models.build("llama", dtype=dtype)
    stats = calibrate(model, TOK, source=DOCS, seq_len=24, batch_size=4, progress=False)
    assert stats.meta["model_dtype"] == str(dtype).replace("torch.", "")
    ids, mask = text_chunks(TOK, DOCS, 24)
    assert_stats_match(stats, model, ids, mask)
    assert next(model.parameters()).dtype == dtype


def test_text_chunking_rule():
    ids, mask = text_chunks(TOK, ["abc", "", "defgh"], seq_len=4)
    # stream: a b c EOS d e f g h -> pieces of 3 after BOS
    body = TOK("abc")["input_ids"] + [2] + TOK("defgh")["input_ids"]
    assert ids[:, 0].tolist() == [1, 1, 1]
    assert ids[0, 1:].tolist() == body[0:3] and ids[1, 1:].tolist() == body[3:6]
    assert ids[2, :4].tolist() == [1] + body[6:9]
    assert mask.tolist() == [[True] * 4, [True] * 4, [True] * 4]
    ids2, mask2 = text_chunks(TOK, ["abcde"], seq_len=4)
    assert mask2.tolist() == [[True] * 4, [True, True, True, False]] and ids2[1, 3] == TOK.pad_token_id
    ids3, _ = text_chunks(TOK, ["abcdefghij"], seq_len=4, num_sequences=2)
    assert ids3.shape == (2, 4)


def test_text_file_source_equals_list(tmp_path):
    model = tiny_models.build("llama")
    text = "Sphinx of black quartz, judge my vow. " * 6
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    from_file = calibrate(model, TOK, source=str(p), seq_len=20, batch_size=4, progress=False)
    from_list = calibrate(model, TOK, source=[text], seq_len=20, batch_size=4, progress=False)
    for a, b in zip(from_file.activation + from_file.impact, from_list.activation + from_list.impact):
        assert torch.equal(a, b)
    assert from_file.meta["text"] == "corpus.txt"


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_nps_matches_reference_forward(family):
    model = tiny_models.build(family)
    kw = dict(num_sequences=6, seq_len=40, batch_size=4, seed=3)
    stats = calibrate(model, TOK, progress=False, **kw)
    ids, mask = generate_nps(model, TOK, **kw)
    # the statistic accumulated during generation (KV cache, one token per forward) equals the
    # statistic of one dense forward over the finished sequences
    assert_stats_match(stats, model, ids, mask)
    m = stats.meta
    assert m["source"] == "nps" and m["prompt"] == "bos" and m["seed"] == 3 and m["num_sequences"] == 6
    assert m["seq_len"] == 40 and m["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert m["architecture"] == type(model).__name__ and m["num_layers"] == tiny_models.LAYERS


def test_nps_sampling_is_seeded_and_stops_at_eos():
    model = tiny_models.build("llama")
    a_ids, a_mask = generate_nps(model, TOK, num_sequences=16, seq_len=40, batch_size=5, seed=0)
    b_ids, b_mask = generate_nps(model, TOK, num_sequences=16, seq_len=40, batch_size=5, seed=0)
    c_ids, _ = generate_nps(model, TOK, num_sequences=16, seq_len=40, batch_size=5, seed=1)
    assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    assert not torch.equal(a_ids, c_ids)
    # one random stream per sequence: the corpus does not depend on the batch size
    d_ids, d_mask = generate_nps(model, TOK, num_sequences=16, seq_len=40, batch_size=16, seed=0)
    assert torch.equal(a_ids, d_ids) and torch.equal(a_mask, d_mask)
    e_ids, _ = generate_nps(model, TOK, num_sequences=6, seq_len=40, batch_size=3, seed=0)
    assert torch.equal(a_ids[:6], e_ids)
    assert (a_ids[:, 0] == TOK.bos_token_id).all() and a_mask[:, 0].all()
    # every row: a prefix of kept tokens, no EOS among them, padding after
    for row, m in zip(a_ids, a_mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert not (row[:n] == TOK.eos_token_id).any()
        assert (row[n:] == TOK.pad_token_id).all()
    # with a 96-token vocabulary, some of 16 x 39 samples hit EOS (else this test proves nothing)
    assert not bool(a_mask.all())
    # rows are sampled independently: not all rows equal
    assert len({tuple(r.tolist()) for r in a_ids}) == 16


def test_nps_uses_full_distribution_at_temperature_one():
    """Ancestral sampling: token frequencies after BOS follow softmax(logits) (no top-k / top-p)."""
    model = tiny_models.build("llama")
    model.generation_config.top_k = 5  # must be ignored: calibrate samples from the full distribution
    ids, _ = generate_nps(model, TOK, num_sequences=2000, seq_len=2, batch_size=2000, seed=0)
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([[1]])).logits[0, -1].double(), -1)
    counts = torch.bincount(ids[:, 1], minlength=tiny_models.VOCAB).double()
    counts[TOK.pad_token_id] += 0  # EOS samples show as padding (id 0); compare on the others
    keep = torch.ones_like(p, dtype=torch.bool)
    keep[[TOK.pad_token_id, TOK.eos_token_id]] = False
    freq = counts[keep] / 2000
    # binomial standard deviation, 5 sigma per token: a top-5 sampler would zero most tokens
    sd = (p[keep] * (1 - p[keep]) / 2000).sqrt()
    assert ((freq - p[keep]).abs() <= 5 * sd + 1e-3).all()
    assert int((counts[keep] > 0).sum()) > 10


def test_chat_prompt():
    model = tiny_models.build("llama")
    tok = ChatCharTokenizer()
    ids, mask = generate_nps(model, tok, num_sequences=3, seq_len=12, batch_size=3, prompt="chat")
    assert ids[:, :4].tolist() == [tok.chat_prompt] * 3
    stats = calibrate(model, tok, num_sequences=3, seq_len=12, batch_size=3, prompt="chat", progress=False)
    assert stats.meta["prompt"] == "chat"
    with pytest.raises(ValueError, match="chat template"):
        calibrate(model, TOK, num_sequences=1, seq_len=8, prompt="chat", progress=False)


def test_calibrate_round_trips_and_is_deterministic(tmp_path):
    model = tiny_models.build("qwen3")
    a = calibrate(model, TOK, num_sequences=4, seq_len=16, batch_size=2, progress=False)
    b = calibrate(model, TOK, num_sequences=4, seq_len=16, batch_size=2, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.activation + a.impact, b.activation + b.impact))
    p = tmp_path / "s.safetensors"
    a.save(p)
    c = GlobalStats.load(p, model=model)
    assert all(torch.equal(x, y) for x, y in zip(a.activation + a.impact, c.activation + c.impact))
    assert c.meta["source"] == "nps" and c.num_tokens == a.num_tokens > 0


def test_bad_arguments():
    model = tiny_models.build("llama")
    with pytest.raises(ValueError, match="not a file"):
        calibrate(model, TOK, source="no_such_corpus.txt", progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        calibrate(model, TOK, seq_len=0, progress=False)
    with pytest.raises(ValueError, match="num_sequences"):
        calibrate(model, TOK, num_sequences=-1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        calibrate(model, TOK, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="prompt"):
        calibrate(model, TOK, num_sequences=1, seq_len=4, prompt="nothing", progress=False)
    with pytest.raises(TypeError, match=r"source\[1\]"):
        calibrate(model, TOK, source=["ok", 3], progress=False)
    with pytest.raises(ValueError, match="no text"):
        calibrate(model, TOK, source=["", "  "], progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate(model, None, progress=False)


def test_refuses_patched_model():
    import glass_kernels.patch as gp

    model = tiny_models.build("llama")
    gp.patch(model, method="griffin", keep=0.5)
    try:
        with pytest.raises(ValueError, match="unpatch"):
            calibrate(model, TOK, num_sequences=1, seq_len=4, progress=False)
    finally:
        gp.unpatch(model)
    calibrate(model, TOK, num_sequences=1, seq_len=4, progress=False)  # fine once unpatched

