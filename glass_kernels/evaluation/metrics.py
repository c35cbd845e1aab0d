"""Quality metrics of a sparse model against the dense one (docs/method.md "Evaluation").

All functions work on logits of teacher-forced positions and a boolean mask of the positions that
count (padding / positions outside the continuation excluded). Reductions run in float64 so that
the sums over thousands of tokens do not depend on the model dtype or on the batch split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

__all__ = [
    "kl_per_token", "nll_per_token", "top1_agree", "jaccard", "jaccard_layers", "TokenScores",
    "perplexity",
]


def _check_logits(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor [..., V]")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got {tuple(x.shape)}")


def _check_mask(mask, shape, name="mask") -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    return mask.bool()


def kl_per_token(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per position, in nats, from logits [..., V] -> float32 [...].

    Computed as sum_v p_ref (log p_ref - log p) with log_softmax in fp32 (fp64 would double the
    memory of a [B, T, 262k] Gemma batch for a change far below the differences reported). Tiny
    negative values from rounding are clamped to 0 (KL >= 0 exactly).
    """
    _check_logits("logits_ref", logits_ref)
    _check_logits("logits", logits)
    if logits_ref.shape != logits.shape:
        raise ValueError(f"logits_ref {tuple(logits_ref.shape)} and logits {tuple(logits.shape)} differ in shape")
    lr = torch.log_softmax(logits_ref.float(), dim=-1)
    ls = torch.log_softmax(logits.float(), dim=-1)
    kl = (lr.exp() * (lr - ls)).sum(-1)
    return kl.clamp_min_(0.0)


def nll_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position from logits [..., V] and integer targets [...] -> float32 [...]."""
    _check_logits("logits", logits)
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must be an integer tensor of shape {tuple(logits.shape[:-1])}")
    V = logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise IndexError(f"targets has ids outside [0, {V})")
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -lp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def top1_agree(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether the argmax tokens agree, per position -> bool [...]."""
    _check_logits("logits_ref", logits_ref)
    _check_logits("logits", logits)
    if logits_ref.shape != logits.shape:
        raise ValueError(f"logits_ref {tuple(logits_ref.shape)} and logits {tuple(logits.shape)} differ in shape")
    return logits_ref.argmax(-1) == logits.argmax(-1)


def perplexity(nll: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """exp(mean NLL) over the masked positions (token-weighted, the usual corpus perplexity)."""
    m = _check_mask(mask, nll.shape)
    v = nll.double() if m is None else nll.double()[m]
    if v.numel() == 0:
        raise ValueError("perplexity of zero tokens is undefined (empty mask)")
    return float(torch.exp(v.mean()))


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A & B| / |A | B| of two index sets given as 1-D integer tensors (duplicates ignored)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D integer tensor of neuron indices")
    sa, sb = set(a.tolist()), set(b.tolist())
    union = len(sa | sb)
    if union == 0:
        raise ValueError("jaccard of two empty sets is undefined")
    return len(sa & sb) / union


def jaccard_layers(sets: Sequence[torch.Tensor], oracle: Sequence[torch.Tensor]) -> list[list[float]]:
    """Per layer, per row: Jaccard of sets[l][b] with oracle[l][b]; a [1, k] set is shared by every row."""
    if len(sets) != len(oracle):
        raise ValueError(f"sets has {len(sets)} layers but oracle has {len(oracle)}")
    out = []
    for l, (s, o) in enumerate(zip(sets, oracle)):
        s2, o2 = torch.atleast_2d(s), torch.atleast_2d(o)
        B = max(s2.shape[0], o2.shape[0])
        if s2.shape[0] not in (1, B) or o2.shape[0] not in (1, B):
            raise ValueError(f"layer {l}: sets rows {s2.shape[0]} and oracle rows {o2.shape[0]} do not match")
        out.append([jaccard(s2[min(b, s2.shape[0] - 1)], o2[min(b, o2.shape[0] - 1)]) for b in range(B)])
    return out


@dataclasses.dataclass
class TokenScores:
    """Running token-weighted sums for one method: add() batches, then read the means.

    kl: mean KL(dense || sparse) per scored token; ppl: perplexity of the continuation under the
    sparse model; top1: share of positions whose argmax equals the dense model's.
    Per-sequence means are kept too (``seq_kl``), for spreads across prompts.
    """

    n: int = 0
    kl_sum: float = 0.0
    nll_sum: float = 0.0
    agree: int = 0
    seq_kl: list = dataclasses.field(default_factory=list)
    seq_nll: list = dataclasses.field(default_factory=list)

    def add(self, kl: torch.Tensor, nll: torch.Tensor, agree: torch.Tensor, mask: torch.Tensor) -> None:
        """kl, nll float [B, T], agree bool [B, T], mask bool [B, T] (True = scored position)."""
        m = _check_mask(mask, kl.shape)
        for name, t in (("nll", nll), ("agree", agree)):
            if t.shape != kl.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(kl.shape)}")
        kl64, nll64 = kl.double() * m, nll.double() * m
        cnt = m.sum(1)
        self.n += int(cnt.sum())
        self.kl_sum += float(kl64.sum())
        self.nll_sum += float(nll64.sum())
        self.agree += int((agree & m).sum())
        for b in range(kl.shape[0]):
            c = int(cnt[b])
            if c:
                self.seq_kl.append(float(kl64[b].sum()) / c)
                self.seq_nll.append(float(nll64[b].sum()) / c)

    def _need(self) -> None:
        if self.n == 0:
            raise ValueError("no scored token yet")

    @property
    def kl(self) -> float:
        self._need()
        return self.kl_sum / self.n

    @property
    def ppl(self) -> float:
        self._need()
        return math.exp(self.nll_sum / self.n)

    @property
    def top1(self) -> float:
        self._need()
        return self.agree / self.n

    def kl_sem(self) -> float:
        """Standard error of the mean of the per-sequence KL (spread across prompts)."""
        v = torch.tensor(self.seq_kl, dtype=torch.float64)
        if v.numel() < 2:
            return float("nan")
        return float(v.std(unbiased=True) / math.sqrt(v.numel()))

    def summary(self) -> dict:
        return {"kl": self.kl, "kl_sem": self.kl_sem(), "ppl": self.ppl, "top1": self.top1,
                "tokens": self.n, "sequences": len(self.seq_kl)}
