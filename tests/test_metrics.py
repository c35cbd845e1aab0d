"""Metric code on hand-computed cases (issue 5 item 4)."""

import math

import pytest
import torch

from glass_kernels.evaluation.metrics import (TokenScores, jaccard, jaccard_layers, kl_per_token,
                                              nll_per_token, perplexity, top1_agree)


def test_kl_of_known_distributions():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    got = kl_per_token(p, q)
    assert got.shape == ()
    assert got.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # logits are shift-invariant: adding a constant changes nothing
    assert kl_per_token(p + 3.0, q - 7.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # asymmetric: KL(q || p) = 1/4 ln(1/2) + 3/4 ln(3/2)
    assert kl_per_token(q, p).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)


def test_kl_zero_for_identical_and_batched_shape():
    x = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    kl = kl_per_token(x, x.clone())
    assert kl.shape == (3, 5)
    assert torch.all(kl == 0)  # clamped at 0, never a negative rounding residue


def test_kl_matches_fp64_oracle():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 1000, generator=g) * 3, torch.randn(4, 1000, generator=g) * 3
    pa = torch.softmax(a.double(), -1)
    want = (pa * (torch.log_softmax(a.double(), -1) - torch.log_softmax(b.double(), -1))).sum(-1)
    # fp32 log_softmax over 1000 entries: relative error ~ V * eps32 in the worst case
    torch.testing.assert_close(kl_per_token(a, b).double(), want, rtol=1e-4, atol=1e-6)


def test_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        kl_per_token(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="logits"):
        kl_per_token(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_nll_and_perplexity_hand_computed():
    # uniform over 4 tokens: NLL = ln 4 for any target, perplexity 4
    logits = torch.zeros(2, 3, 4)
    t = torch.tensor([[0, 1, 2], [3, 3, 0]])
    nll = nll_per_token(logits, t)
    torch.testing.assert_close(nll, torch.full((2, 3), math.log(4)))
    assert perplexity(nll) == pytest.approx(4.0)
    # p(target) = 1/2 and 1/8 -> perplexity = exp((ln 2 + ln 8) / 2) = 4
    lg = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(1 / 8), math.log(7 / 8)]])
    nll2 = nll_per_token(lg, torch.tensor([0, 0]))
    assert perplexity(nll2) == pytest.approx(4.0, rel=1e-6)
    # the mask drops positions
    assert perplexity(nll2, torch.tensor([True, False])) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="empty"):
        perplexity(nll2, torch.tensor([False, False]))
    with pytest.raises(IndexError, match="targets"):
        nll_per_token(lg, torch.tensor([0, 2]))


def test_top1_agree():
    a = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    b = torch.tensor([[0.0, 1.0], [0.1, 0.2], [0.9, 0.1]])
    assert top1_agree(a, b).tolist() == [True, False, False]


def test_jaccard_hand_computed():
    assert jaccard(torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5])) == pytest.approx(2 / 6)
    assert jaccard(torch.tensor([1, 2]), torch.tensor([2, 1])) == 1.0
    assert jaccard(torch.tensor([1]), torch.tensor([2])) == 0.0
    with pytest.raises(ValueError, match="empty"):
        jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="1-D integer"):
        jaccard(torch.tensor([1.0]), torch.tensor([1]))


def test_jaccard_layers_shared_set_broadcasts():
    sets = [torch.tensor([[0, 1]]), torch.tensor([[0, 1], [2, 3]])]
    oracle = [torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0, 1], [0, 1]])]
    assert jaccard_layers(sets, oracle) == [[1.0, 1 / 3], [1.0, 0.0]]
    with pytest.raises(ValueError, match="layers"):
        jaccard_layers(sets, oracle[:1])


def test_token_scores_are_token_weighted():
    s = TokenScores()
    kl = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    nll = torch.tensor([[math.log(2), math.log(2), 9.0], [math.log(8), 9.0, 9.0]])
    agree = torch.tensor([[True, False, True], [True, True, True]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    s.add(kl, nll, agree, mask)
    assert s.n == 3
    assert s.kl == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert s.ppl == pytest.approx(math.exp((2 * math.log(2) + math.log(8)) / 3))  # = 2^(5/3)
    assert s.top1 == pytest.approx(2 / 3)
    assert s.seq_kl == [2.0, 2.0]
    assert s.summary()["sequences"] == 2
    with pytest.raises(ValueError, match="no scored token"):
        TokenScores().kl
