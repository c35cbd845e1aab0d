"""The evaluation driver's teacher-forced scoring on a tiny model (no downloads)."""

import json

import pytest
import torch

from glass_kernels.evaluation import run as R
from glass_kernels.evaluation.metrics import TokenScores
from tiny_models import build, random_stats

pytest.importorskip("transformers")


class _Tok:
    """Just what the driver needs from a tokenizer: a pad id."""

    pad_token_id = 0


@pytest.fixture(scope="module")
def model():
    return build("llama", seed=3)


def _batch(model, lens=(5, 9, 3), n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 96, (L,), generator=g).tolist() for L in lens]
    conts = R.dense_continuations(model, _Tok(), prompts, n, cache_file=None, fingerprint="tiny", batch_size=8)
    return prompts, conts, R.make_batch(prompts, conts, 0)


def test_dense_vs_itself_is_kl_zero_top1_one(model):
    prompts, conts, b = _batch(model)
    ref = R.reference_pass(model, b)
    with torch.inference_mode():
        plain = R._forward_pair(model, b)  # the unpatched model, same inputs
    s = TokenScores()
    from glass_kernels.evaluation.metrics import kl_per_token, nll_per_token, top1_agree

    s.add(kl_per_token(ref.logits, plain), nll_per_token(plain, b.targets), top1_agree(ref.logits, plain),
          torch.ones(b.targets.shape, dtype=torch.bool))
    assert s.kl == pytest.approx(0.0, abs=1e-7)
    assert s.top1 == 1.0
    # the continuation is the dense model's own greedy choice: the reference argmax reproduces it
    assert torch.equal(ref.logits.argmax(-1), b.targets)


def test_keep_one_scores_like_dense(model):
    prompts, conts, b = _batch(model)
    ref = R.reference_pass(model, b)
    for cfg in (R.Config("griffin", 1.0), R.Config("oracle", 1.0)):
        s = TokenScores()
        R.score_config(model, cfg, b, ref, {}, s)
        assert s.n == b.targets.numel()
        # all D neurons: only summation-order differences of the sparse kernel (fp32)
        assert s.kl < 1e-6, cfg
        assert s.top1 == 1.0, cfg


def test_sparse_configs_differ_and_model_is_restored(model):
    from glass_kernels.patch import is_patched

    prompts, conts, b = _batch(model)
    ref = R.reference_pass(model, b)
    stats = {"nps": random_stats(model, seed=1)}
    got = {}
    for cfg in (R.Config("random", 0.3), R.Config("a-glass", 0.3, 0.5, "nps"), R.Config("global", 0.3, stats="nps")):
        s = TokenScores()
        sets = R.score_config(model, cfg, b, ref, stats, s, want_sets=True)
        assert len(sets) == 2 and all(t.shape[-1] == int(0.3 * 88) for t in sets)
        got[cfg.key] = s.kl
        assert not is_patched(model)
    assert all(v > 1e-4 for v in got.values()), got


def test_oracle_statistic_is_the_continuations_own(model):
    """Oracle = sum over continuation tokens of (h / ||h||)^2, computed here with plain torch hooks."""
    prompts, conts, b = _batch(model)
    ref = R.reference_pass(model, b)
    captured = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
             for layer in model.model.layers]
    try:
        with torch.inference_mode():
            R._forward_pair(model, b)
    finally:
        for h in hooks:
            h.remove()
    L = len(model.model.layers)
    cont_h = captured[L:]  # the second forward (continuation) of each layer
    for l in range(L):
        h = cont_h[l].double()
        want = ((h / h.norm(dim=-1, keepdim=True)) ** 2).sum(1)
        torch.testing.assert_close(ref.oracle_stat[l].double(), want, rtol=1e-4, atol=1e-5)
    k = [20, 20]
    sets = R.oracle_sets(ref.oracle_stat, k)
    for l in range(L):
        h = cont_h[l].double()
        want = ((h / h.norm(dim=-1, keepdim=True)) ** 2).sum(1).topk(20, dim=-1).indices.sort(-1).values
        assert torch.equal(sets[l].long(), want)


def test_continuations_are_cached(model, tmp_path):
    prompts = [[5, 6, 7], [8, 9]]
    f = tmp_path / "c.json"
    a = R.dense_continuations(model, _Tok(), prompts, 6, cache_file=f, fingerprint="fp", batch_size=2)
    assert all(len(c) == 6 for c in a)
    assert len(json.loads(f.read_text())) == 2

    class NoGen:
        def generate(self, *a, **k):
            raise AssertionError("generate() called despite the cache")

    assert R.dense_continuations(NoGen(), _Tok(), prompts, 6, cache_file=f, fingerprint="fp", batch_size=2) == a
    # a left-padded batch gives each prompt the same continuation as alone (positions from the mask)
    alone = R.dense_continuations(model, _Tok(), [prompts[1]], 6, cache_file=None, fingerprint="fp", batch_size=1)
    assert alone[0] == a[1]


def test_make_batch_positions_and_masks():
    b = R.make_batch([[1, 2, 3], [4]], [[5, 6, 7], [8, 9, 10]], 0)
    assert b.ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b.pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert b.cont_in.tolist() == [[5, 6], [8, 9]] and b.targets.tolist() == [[6, 7], [9, 10]]
    assert b.cont_pos.tolist() == [[3, 4], [1, 2]]
    assert b.cont_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="at least 2"):
        R.make_batch([[1]], [[2]], 0)


def test_spread_covers_kinds():
    from glass_kernels.evaluation.data import KINDS, load_prompts

    sub = R.spread(load_prompts("heldout"), 6)
    assert {p["kind"] for p in sub} == set(KINDS)


def test_quantized_configs_cost_little_and_leave_the_float_model():
    """dense int8 / int4 against the float dense model: a small, ordered KL; the model's float
    weights are put back after each quantized configuration (unpatch alone would leave them
    dequantized)."""
    from tiny_models import width_overrides

    m = build("llama", seed=3, **width_overrides("llama", 64))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    prompts, conts, b = _batch(m)
    ref = R.reference_pass(m, b)
    kl = {}
    for cfg in R.quant_configs(0.75)[:2]:  # dense int8, dense int4
        assert cfg.weights and cfg.key.endswith("]@1")
        s = TokenScores()
        R.score_config(m, cfg, b, ref, {}, s)
        kl[cfg.weights] = s.kl
        now = m.state_dict()
        assert all(torch.equal(now[k], v) for k, v in before.items()), cfg
    assert 0 < kl["int8"] < kl["int4"], kl
