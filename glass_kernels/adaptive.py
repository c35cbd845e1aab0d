"""Selection that adapts to the prompt's length and to each layer (docs/method.md, "Adaptive selection").

GLASS aggregates two rankings, a(i) = λ r_G(i) + (1 − λ) r_L(i). Read as a consensus of two noisy
rankings, λ is the global prior's share of the two precisions. The local ranking's precision grows
with the evidence behind it, the number n of prompt tokens that carried statistics, while the
prior's is fixed once calibrated. That gives one parameter, τ, "the prompt tokens the prior is worth":

    λ(n) = τ / (τ + n)          (n = 0: λ = 1, the prior alone; τ = 0: GRIFFIN; τ = ∞: global only)

A :class:`SelectionFit`, stored in the statistics file beside the global statistics, holds

* ``tau``: one τ for every layer (``GlassConfig(lam="length")``);
* ``layer_tau``: one τ per layer (``GlassConfig(lam="layer")``): per-layer λ that also follows n;
* ``keep_grid`` / ``layer_loss``: each layer's estimated loss (KL of the output when that layer alone
  is sparse) as a function of its kept fraction, from which ``GlassConfig(keep_split="fitted")``
  splits the user's FFN budget across layers (:meth:`SelectionFit.layer_k`): the same bytes per
  decode step as the uniform split, spent where they buy the most;
* ``keep_shrink``: how much of that reallocation is applied (0 = the uniform split, 1 = all of it).
  The loss curves add up one-layer-at-a-time measurements, which overstates what moving neurons
  between layers gains when every layer is sparse at once; the share is fitted by KL like τ.
* ``refine_keeps`` / ``refine``: the *joint-context refinement* of that split, per fitted keep: with
  every layer sparse at the fitted allocation, each layer is given one step (D / 16 neurons) more and
  one step less, and the output's KL change per weight element says what its neurons are worth in
  the model as it will run; steps then move from the cheapest layers to the most valuable ones
  (:func:`plan_moves`, at most L / 3 moves, each while its gain exceeds its cost). How many of them
  are applied (none, the best half, all) is decided by the KL of other tune prompts than those that
  measured them. Other keeps use the nearest refined keep's changes scaled by the ratio of the keeps.

How the fit is made (:func:`fit_selection`): prompts (by default the evaluation's tune split, at four
prompt lengths) are continued greedily by the dense model. For each prompt and layer, the *oracle*
statistic (the same activation statistic over the continuation) says which neurons the continuation
uses, and a rule's set can be scored by the share of the oracle's mass it captures
(:func:`captured_mass`, a proxy that needs no forward pass). τ is the grid value with the lowest
KL(dense ‖ sparse) on the continuations; the proxy only ranks the layers (τ_l = τ x the layer's
proxy optimum / the all-layer proxy optimum); each layer's loss curve is the proxy's complement
scaled to a measured KL: the model's output with only that layer sparse, at two keeps (TEAL-style
per-layer sensitivity); the share of the reallocation is the grid value with the lowest KL of the
whole model (every layer sparse, λ(n) with the shared τ); the refinement measures on the per-layer
sensitivity prompts. Nothing here is tuned on held-out prompts. What the options gave on the
real models: README, "Adaptive selection" (they stay opt-in).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import time
from typing import Callable, Sequence

import torch

from .ffn import find_ffn_sites
from .patch.config import kept_neurons
from .patch.selection import select_per_row
from .stats import stat_ranks

logger = logging.getLogger(__name__)

__all__ = ["SelectionFit", "FitSample", "lam_of_length", "captured_mass", "fit_tau", "fit_selection",
           "TAU_GRID", "KEEP_GRID", "SENSITIVITY_KEEPS", "SHRINK_GRID"]

# τ candidates: 0 (GRIFFIN), a geometric grid from 2 to 16384 prompt tokens, ∞ (global only).
TAU_GRID = (0.0,) + tuple(float(2 ** (e / 2)) for e in range(2, 29)) + (math.inf,)
# Kept fractions at which each layer's loss curve is stored (the allocation interpolates between them).
KEEP_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))
# Keeps at which one layer at a time is made sparse and the output's KL measured.
SENSITIVITY_KEEPS = (0.5, 0.25)
# Shares of the fitted per-layer reallocation scored by KL (0 = uniform split, 1 = the whole allocation).
SHRINK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# The refinement moves neurons between layers in steps of D / REFINE_STEPS.
REFINE_STEPS = 16
# The proxy's keeps: the range users run (docs/method.md's evaluation keeps).
FIT_KEEPS = (0.5, 0.3)


def lam_of_length(tau: float | torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """λ(n) = τ / (τ + n) in float64 (τ = ∞ gives 1, n = 0 gives 1, τ = 0 with n > 0 gives 0)."""
    n = n.to(torch.float64).clamp_min(0.0)
    tau = torch.as_tensor(tau, dtype=torch.float64)
    lam = torch.where(torch.isinf(tau), torch.ones_like(n), tau / (tau + n))
    return torch.where(n == 0, torch.ones_like(lam), lam).clamp(0.0, 1.0)


@dataclasses.dataclass
class SelectionFit:
    """Fitted adaptive-selection parameters of one model (see the module docstring)."""

    tau: float
    layer_tau: list[float]
    keep_grid: torch.Tensor  # fp64 [G], increasing, in (0, 1]
    layer_loss: torch.Tensor  # fp64 [L, G], each row non-increasing
    meta: dict = dataclasses.field(default_factory=dict)
    keep_shrink: float = 1.0  # share of the loss-curve reallocation applied (files from before it: 1)
    # the joint-context refinement: per fitted keep, each layer's change of kept fraction (files from
    # before it: none)
    refine_keeps: torch.Tensor | None = None  # fp64 [K]
    refine: torch.Tensor | None = None  # fp64 [K, L], (k_refined - k) / D per layer

    def __post_init__(self) -> None:
        self.tau = float(self.tau)
        self.layer_tau = [float(t) for t in self.layer_tau]
        self.keep_grid = torch.as_tensor(self.keep_grid, dtype=torch.float64).reshape(-1)
        self.layer_loss = torch.as_tensor(self.layer_loss, dtype=torch.float64)
        L, G = len(self.layer_tau), self.keep_grid.numel()
        if any(math.isnan(t) or t < 0 for t in [self.tau] + self.layer_tau):
            raise ValueError("tau values must be >= 0 (inf allowed)")
        if G < 2 or bool((self.keep_grid <= 0).any()) or bool((self.keep_grid > 1).any()) \
                or bool((self.keep_grid[1:] <= self.keep_grid[:-1]).any()):
            raise ValueError("keep_grid must hold >= 2 increasing fractions in (0, 1]")
        if tuple(self.layer_loss.shape) != (L, G):
            raise ValueError(f"layer_loss must have shape [{L}, {G}], got {tuple(self.layer_loss.shape)}")
        if not bool(torch.isfinite(self.layer_loss).all()) or bool((self.layer_loss < 0).any()):
            raise ValueError("layer_loss must be finite and >= 0")
        self.keep_shrink = float(self.keep_shrink)
        if not 0.0 <= self.keep_shrink <= 1.0:  # also rejects NaN
            raise ValueError(f"keep_shrink must be in [0, 1], got {self.keep_shrink}")
        self._check_refine(L)

    def _check_refine(self, L: int) -> None:
        keeps = torch.zeros(0) if self.refine_keeps is None else torch.as_tensor(self.refine_keeps, dtype=torch.float64)
        self.refine_keeps = keeps.reshape(-1)
        K = self.refine_keeps.numel()
        if self.refine is None and K:
            raise ValueError("refine_keeps without refine")
        self.refine = torch.zeros(K, L, dtype=torch.float64) if self.refine is None \
            else torch.as_tensor(self.refine, dtype=torch.float64)
        if tuple(self.refine.shape) != (K, L):
            raise ValueError(f"refine must have shape [{K}, {L}] (one row per refined keep), got {tuple(self.refine.shape)}")
        if bool((self.refine_keeps <= 0).any()) or bool((self.refine_keeps > 1).any()) \
                or not bool(torch.isfinite(self.refine).all()) or bool((self.refine.abs() > 1).any()):
            raise ValueError("refine_keeps must lie in (0, 1] and refine in [-1, 1]")

    @property
    def num_layers(self) -> int:
        return len(self.layer_tau)

    def lam(self, n_tokens: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Per row λ for prompts of ``n_tokens`` tokens (fp64 [R]); ``layer`` None: the shared τ."""
        tau = self.tau if layer is None else self.layer_tau[layer]
        return lam_of_length(tau, n_tokens)

    def loss_at(self, layer: int, frac: float) -> float:
        """The layer's estimated loss at kept fraction ``frac`` (linear between grid points)."""
        g, y = self.keep_grid, self.layer_loss[layer]
        if frac >= float(g[-1]):
            return float(y[-1]) * (1.0 - frac) / max(1e-12, 1.0 - float(g[-1])) if float(g[-1]) < 1 else 0.0
        if frac <= float(g[0]):  # below the grid: extend the first segment's slope
            slope = (float(y[0]) - float(y[1])) / float(g[1] - g[0])
            return float(y[0]) + slope * (float(g[0]) - frac)
        j = int(torch.searchsorted(g, torch.tensor(frac, dtype=torch.float64)).item())
        t = (frac - float(g[j - 1])) / float(g[j] - g[j - 1])
        return float(y[j - 1]) * (1 - t) + float(y[j]) * t

    def layer_k(self, keep: float, D: Sequence[int], row_elems: Sequence[int]) -> list[int]:
        """Neurons per layer for an average kept fraction ``keep`` of the FFN's weight bytes.

        The budget is exactly the uniform split's, sum_l floor(keep * D_l) * row_elems_l (row_elems:
        weight elements per neuron). The loss curves' allocation (:meth:`allocate`) is applied by the
        share ``keep_shrink``: k_l = u_l + floor(share * (k*_l - u_l)), which never exceeds the
        budget; what the rounding leaves is spent greedily as in the allocation."""
        if len(D) != self.num_layers or len(row_elems) != self.num_layers:
            raise ValueError(f"this fit has {self.num_layers} layers, the model {len(D)}")
        uniform = [kept_neurons(keep, d) for d in D]
        budget = sum(k * r for k, r in zip(uniform, row_elems))
        if self.keep_shrink == 0.0:
            k = uniform
        elif self.keep_shrink == 1.0:
            k = self.allocate(keep, D, row_elems)
        else:
            full = self.allocate(keep, D, row_elems)
            k = [max(1, u + math.floor(self.keep_shrink * (f - u))) for u, f in zip(uniform, full)]
            k = self._spend(k, budget, D, row_elems)
        return self._refined(k, keep, budget, D, row_elems)

    def _refined(self, k: list[int], keep: float, budget: int, D: Sequence[int], row_elems: Sequence[int]) -> list[int]:
        """``k`` with the joint-context refinement of the nearest refined keep, its changes of kept
        fraction scaled by keep / that keep; rounding never exceeds the budget (what it leaves is spent
        as in the allocation)."""
        if self.refine_keeps.numel() == 0:
            return k
        j = int((self.refine_keeps - keep).abs().argmin())
        scale = keep / float(self.refine_keeps[j])
        moved = [min(d, max(1, kk + round(scale * float(self.refine[j, l]) * d))) for l, (kk, d) in enumerate(zip(k, D))]
        spent = sum(m * r for m, r in zip(moved, row_elems))
        for l in sorted(range(len(D)), key=lambda l: k[l] - moved[l]):  # the largest gains give back first
            while spent > budget and moved[l] > max(1, k[l]):
                moved[l] -= 1
                spent -= row_elems[l]
        return self._spend(moved, budget, D, row_elems)

    def allocate(self, keep: float, D: Sequence[int], row_elems: Sequence[int]) -> list[int]:
        """The loss curves' split of the uniform budget: starting from 1/4 of the uniform fraction
        (and at least 1 neuron) in every layer, spent greedily where the estimated loss falls most
        per element, in steps of ~1/256 of a layer, never beyond D_l."""
        uniform = [kept_neurons(keep, d) for d in D]
        budget = sum(k * r for k, r in zip(uniform, row_elems))
        k = [max(1, min(u, int(math.floor(0.25 * keep * d)))) for u, d in zip(uniform, D)]
        return self._spend(k, budget, D, row_elems)

    def _spend(self, k: list[int], budget: int, D: Sequence[int], row_elems: Sequence[int]) -> list[int]:
        """Add neurons to ``k`` (in place) where the estimated loss falls most per element, until the
        budget (weight elements) is spent or no layer's rows fit what is left."""
        spent = sum(kk * r for kk, r in zip(k, row_elems))
        steps = [max(1, d // 256) for d in D]

        def gain(l: int) -> float:
            step = min(steps[l], D[l] - k[l])
            if step <= 0:
                return -math.inf
            drop = self.loss_at(l, k[l] / D[l]) - self.loss_at(l, (k[l] + step) / D[l])
            return drop / (step * row_elems[l])

        heap = [(-gain(l), l) for l in range(len(D))]
        heapq.heapify(heap)
        while heap and spent < budget:
            g, l = heapq.heappop(heap)
            if g == math.inf:
                break
            step = min(steps[l], D[l] - k[l], (budget - spent) // row_elems[l])
            if step <= 0:
                continue  # this layer's rows no longer fit the remaining budget
            k[l] += step
            spent += step * row_elems[l]
            heapq.heappush(heap, (-gain(l), l))
        return k

    # ---- storage (inside the GlobalStats safetensors file) ---------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"fit.tau": torch.tensor([self.tau], dtype=torch.float64),
               "fit.layer_tau": torch.tensor(self.layer_tau, dtype=torch.float64),
               "fit.keep_grid": self.keep_grid.clone(), "fit.layer_loss": self.layer_loss.clone(),
               "fit.keep_shrink": torch.tensor([self.keep_shrink], dtype=torch.float64)}
        if self.refine_keeps.numel():
            out |= {"fit.refine_keeps": self.refine_keeps.clone(), "fit.refine": self.refine.clone()}
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "SelectionFit":
        shrink = tensors.get("fit.keep_shrink")
        return cls(float(tensors["fit.tau"].reshape(-1)[0]), tensors["fit.layer_tau"].tolist(),
                   tensors["fit.keep_grid"], tensors["fit.layer_loss"], dict(meta),
                   1.0 if shrink is None else float(shrink.reshape(-1)[0]),
                   tensors.get("fit.refine_keeps"), tensors.get("fit.refine"))

    def unrefined(self) -> "SelectionFit":
        """This fit without the joint-context refinement (the evaluation scores what it adds)."""
        return dataclasses.replace(self, refine_keeps=None, refine=None)

    # every fit holds these; OPTIONAL_TENSOR_NAMES are absent from files written before they existed
    TENSOR_NAMES = ("fit.tau", "fit.layer_tau", "fit.keep_grid", "fit.layer_loss")
    OPTIONAL_TENSOR_NAMES = ("fit.keep_shrink", "fit.refine_keeps", "fit.refine")


# ---------------------------------------------------------------------------------------------------
# the proxy: the share of the continuation's activation mass a set captures
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FitSample:
    """One prompt's evidence for the fit: its statistic-carrying tokens and, per layer, the prompt's
    local statistic and the oracle statistic of its dense continuation (fp32 [D] sums of squares)."""

    n_tokens: int
    prompt: list[torch.Tensor]
    oracle: list[torch.Tensor]


def _mass_curves(local: torch.Tensor, global_rank: torch.Tensor, oracle: torch.Tensor,
                 lams: torch.Tensor) -> torch.Tensor:
    """[len(lams), D]: for each λ, the captured oracle share of the best 1..D neurons by aggregate
    (the same order select_neurons uses: aggregate, then local rank, then index)."""
    rl = stat_ranks(local).to(torch.float64)
    rg = global_rank.to(torch.float64)
    D = rl.numel()
    agg = lams[:, None] * rg[None, :] + (1 - lams[:, None]) * rl[None, :]
    key = agg * (D + 1) + rl[None, :]  # distinct keys: the local rank breaks exact ties
    order = torch.argsort(key, dim=1)
    o = oracle.to(torch.float64)
    total = float(o.sum())
    if total <= 0:
        return torch.ones(len(lams), D, dtype=torch.float64)
    return o[order].cumsum(1) / total


def captured_mass(local: torch.Tensor, global_rank: torch.Tensor, oracle: torch.Tensor, lam: float,
                  k: int) -> float:
    """Share of the oracle statistic's mass in the k neurons that rank aggregation at ``lam`` keeps."""
    return float(_mass_curves(local, global_rank, oracle, torch.tensor([float(lam)], dtype=torch.float64))[0, k - 1])


def fit_tau(samples: Sequence[FitSample], global_ranks: Sequence[torch.Tensor], keeps: Sequence[float] = FIT_KEEPS,
            tau_grid: Sequence[float] = TAU_GRID) -> tuple[torch.Tensor, list[float]]:
    """Mean captured mass [L, len(tau_grid)] over samples and keeps, and the grid itself."""
    L = len(global_ranks)
    taus = torch.tensor(tau_grid, dtype=torch.float64)
    score = torch.zeros(L, len(tau_grid), dtype=torch.float64)
    for s in samples:
        lams = lam_of_length(taus, torch.full_like(taus, float(s.n_tokens)))
        for l in range(L):
            curves = _mass_curves(s.prompt[l], global_ranks[l], s.oracle[l], lams)
            D = curves.shape[1]
            for keep in keeps:
                score[l] += curves[:, kept_neurons(keep, D) - 1]
    score /= max(1, len(samples) * len(keeps))
    return score, list(tau_grid)


def mean_mass_by_keep(samples: Sequence[FitSample], global_ranks: Sequence[torch.Tensor],
                      layer_tau: Sequence[float], keep_grid: Sequence[float]) -> torch.Tensor:
    """[L, G]: mean captured share at each grid keep, each layer selecting with its own λ_l(n)."""
    L = len(global_ranks)
    out = torch.zeros(L, len(keep_grid), dtype=torch.float64)
    for s in samples:
        for l in range(L):
            lam = lam_of_length(layer_tau[l], torch.tensor([float(s.n_tokens)]))
            curve = _mass_curves(s.prompt[l], global_ranks[l], s.oracle[l], lam)[0]
            D = curve.numel()
            idx = torch.tensor([kept_neurons(g, D) - 1 for g in keep_grid])
            out[l] += curve[idx]
    return out / max(1, len(samples))


def loss_curves(mass: torch.Tensor, keep_grid: Sequence[float], measured: dict[float, torch.Tensor]) -> torch.Tensor:
    """[L, G] estimated KL of each layer alone sparse: s_l * (1 - m_l(g))^p_l, with s_l and p_l such
    that the curve passes through the two measured points (``measured``: keep -> KL [L])."""
    grid = list(keep_grid)
    (ka, kb) = sorted(measured, reverse=True)[:2]  # the larger keep first
    ia, ib = _nearest(grid, ka), _nearest(grid, kb)
    ua = (1 - mass[:, ia]).clamp_min(1e-6)
    ub = (1 - mass[:, ib]).clamp_min(1e-6)
    kla = measured[ka].to(torch.float64).clamp_min(1e-9)
    klb = torch.maximum(measured[kb].to(torch.float64), kla)  # fewer neurons never measure better
    ratio = torch.log(ub / ua)
    p = torch.where(ratio.abs() > 1e-6, torch.log(klb / kla) / ratio.where(ratio.abs() > 1e-6, torch.ones_like(ratio)),
                    torch.ones_like(ratio)).clamp(0.5, 4.0)
    s = kla / ua.pow(p)
    curves = s[:, None] * (1 - mass).clamp_min(0.0).pow(p[:, None])
    # non-increasing in keep (the mass is non-decreasing, up to the noise of averaging)
    return torch.flip(torch.cummax(torch.flip(curves, [1]), 1).values, [1])


def _nearest(grid: Sequence[float], x: float) -> int:
    return min(range(len(grid)), key=lambda i: abs(grid[i] - x))


# ---------------------------------------------------------------------------------------------------
# the fit pass on a model
# ---------------------------------------------------------------------------------------------------

def fit_prompts(tok, chat: bool, n_prompts: int = 24, context_tokens: Sequence[int] = (0, 64, 128, 256),
                texts: Sequence[str] | None = None, system: str | None = None) -> list[tuple[int, list[int]]]:
    """The fit's prompts as (context tokens, ids): ``texts`` (default: the packaged tune split, spread
    over its kinds) at each prompt length, longer ones made by prepending other prompts."""
    from .evaluation.data import load_prompts
    from .evaluation.run import encode_prompts, length_prompts, spread

    if texts is None:
        items = spread(load_prompts("tune"), n_prompts)
        pool = load_prompts("tune")
    else:
        items = [{"id": f"user-{i}", "kind": "user", "text": t} for i, t in enumerate(texts[:n_prompts])]
        pool = items
    out = []
    for target in context_tokens:
        ids = encode_prompts(tok, length_prompts(items, pool, tok, chat, target), chat, system=system)
        out += [(target, p) for p in ids]
    return out


def fit_selection(model, tok, stats, *, prompts: Sequence[Sequence[int]] | None = None, n_prompts: int = 24,
                  context_tokens: Sequence[int] = (0, 64, 128, 256), gen_tokens: int = 32, batch_size: int = 8,
                  kl_prompts: int = 48, sensitivity_prompts: int = 16, cache_file=None, progress: bool = True,
                  log: Callable[[str], None] | None = None):
    """Fit the adaptive selection of ``stats`` (a GlobalStats of ``model``) and return a copy of the
    stats that carries it (``stats.fit``).

    1. ``prompts`` (default: ``n_prompts`` of the packaged tune split at each of ``context_tokens``)
       are continued greedily by the dense model for ``gen_tokens`` tokens;
    2. tau: the lowest KL(dense || sparse) on the continuations of ``kl_prompts`` of them, over
       TAU_KL_GRID, at keeps 0.5 and 0.3;
    3. per-layer tau: each layer's proxy optimum (captured oracle share, every prompt) relative to
       the proxy's all-layer optimum, times the KL-fitted tau (the proxy ranks the layers, the KL
       sets the level: the proxy alone undervalues the prior, see docs/method.md);
    4. per-layer loss curves: the captured share at every keep of KEEP_GRID, scaled to the KL of the
       output with only that layer sparse, measured at two keeps on ``sensitivity_prompts`` prompts;
    5. the share of the curves' reallocation applied (SHRINK_GRID): the lowest KL of the whole model
       on the tau prompts' continuations (every layer sparse at once);
    6. the joint-context refinement of the split at each of FIT_KEEPS (module docstring), on the
       ``sensitivity_prompts``: 2 L + 2 passes of them per keep.

    Cost (SmolLM2-135M, defaults, 2 cores): a few minutes, most of it the per-layer passes."""
    from .evaluation.run import _pad_id, dense_continuations, make_batch, reference_pass
    from .stats import model_signature

    say = log or logger.info
    t0 = time.perf_counter()
    stats.check_model(model)
    chat = getattr(tok, "chat_template", None) is not None
    if prompts is None:
        prompts = [p for _, p in fit_prompts(tok, chat, n_prompts, context_tokens)]
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("fit_selection needs at least one prompt")
    pad = _pad_id(tok)
    fingerprint = model_signature(model)["fingerprint"]
    bar = _bar(len(prompts), "fit: dense continuations", progress)
    conts = dense_continuations(model, tok, prompts, gen_tokens, cache_file=cache_file, fingerprint=fingerprint,
                                batch_size=batch_size, progress=bar.update if bar is not None else None)
    _close(bar)
    ranks = stats.ranks("activation")
    samples: list[FitSample] = []
    refs = []
    kl = _KLScores(TAU_KL_GRID, FIT_KEEPS)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    n_batches = math.ceil(len(order) / batch_size)
    # batches spread over the prompt lengths (a long prompt costs nothing more there: its cache is reused)
    kl_picked = _spread_picks(n_batches, math.ceil(kl_prompts / batch_size))
    sens_picked = _spread_picks(n_batches, math.ceil(sensitivity_prompts / batch_size))
    kl_chunks = []  # the KL-scored batches' prompts, scored again for the reallocation's share
    check_chunks = []  # those of them the sensitivity passes did not see: the refinement's check
    bar = _bar(n_batches, "fit: reference passes, tau by KL", progress)
    for j, s in enumerate(range(0, len(order), batch_size)):
        chunk = order[s:s + batch_size]
        batch = make_batch([prompts[i] for i in chunk], [conts[i] for i in chunk], pad)
        ref = reference_pass(model, batch, keep_prompt_cache=j in kl_picked or j in sens_picked)
        n = batch.mask.sum(1)
        for b in range(len(chunk)):
            samples.append(FitSample(int(n[b]), [t[b].clone() for t in ref.prompt_stat],
                                     [t[b].clone() for t in ref.oracle_stat]))
        if j in kl_picked:
            kl.score(model, batch, ref, ranks, stats.D)
            kl_chunks.append(chunk)
            if j not in sens_picked:
                check_chunks.append(chunk)
        if j in sens_picked:
            refs.append((batch, ref))
        if bar is not None:
            bar.update(1)
    _close(bar)
    tau = kl.best()
    proxy, grid = fit_tau(samples, ranks)
    proxy_tau = grid[int(proxy.mean(0).argmax())]
    layer_tau = [_rescale(grid[int(proxy[l].argmax())], proxy_tau, tau) for l in range(proxy.shape[0])]
    say(f"fit: tau {tau:g} (KL); proxy optimum {proxy_tau:g}; per layer {[round(t, 1) for t in layer_tau]}")
    mass = mean_mass_by_keep(samples, ranks, layer_tau, KEEP_GRID)
    measured = _layer_sensitivity(model, stats, refs, layer_tau, progress)
    loss = loss_curves(mass, KEEP_GRID, measured)
    fit = SelectionFit(tau, layer_tau, torch.tensor(KEEP_GRID), loss)
    shrink_kl = _shrink_scores(model, stats.with_fit(fit), [[prompts[i] for i in c] for c in kl_chunks],
                               [[conts[i] for i in c] for c in kl_chunks], pad, progress)
    shrink = min(SHRINK_GRID, key=lambda a: (shrink_kl[a], a))  # a tie goes to the smaller share
    say(f"fit: share of the per-layer keep reallocation {shrink:g} (KL by share: "
        + ", ".join(f"{a:g} {v:.4f}" for a, v in shrink_kl.items()) + ")")
    fit = dataclasses.replace(fit, keep_shrink=shrink)
    checks = [([prompts[i] for i in c], [conts[i] for i in c]) for c in check_chunks]
    refine, refine_report = _refine_allocation(model, stats.with_fit(fit), refs, checks, pad,
                                               [s.handler.row_elems for s in find_ffn_sites(model)], progress)
    say("fit: joint-context refinement " + "; ".join(refine_summary(k, r) for k, r in refine_report.items()))
    meta = {"tau_objective": "KL(dense || sparse) on the fit prompts' continuations, keeps 0.5 and 0.3",
            "tau_kl": {f"{t:g}": v for t, v in kl.mean().items()}, "kl_prompts": kl.sequences,
            "layer_objective": "captured share of the continuation's activation statistic, rescaled to tau",
            "proxy_tau": json_float(proxy_tau), "prompts": len(prompts), "gen_tokens": gen_tokens,
            "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
            "sensitivity_prompts": sum(int(b.ids.shape[0]) for b, _ in refs),
            "sensitivity_keeps": list(SENSITIVITY_KEEPS),
            "keep_shrink_objective": "KL(dense || sparse) of the whole model on the tau prompts' continuations, "
                                     "lambda(n) with the shared tau, keeps 0.5 and 0.3",
            "keep_shrink_kl": {f"{a:g}": v for a, v in shrink_kl.items()},
            "refine_objective": "KL(dense || sparse) of the whole model on the sensitivity prompts, every layer "
                                "sparse at the fitted allocation; one step = D / 16 neurons; the number of "
                                "moves applied (none, the best half, all) by the KL of the check prompts",
            "refine_check_prompts": sum(len(p) for p, _ in checks) or "the sensitivity prompts",
            "refine": refine_report,
            "seconds": round(time.perf_counter() - t0, 1)}
    fit = SelectionFit(tau, layer_tau, torch.tensor(KEEP_GRID), loss, meta, shrink,
                       torch.tensor(FIT_KEEPS, dtype=torch.float64), refine)
    say(f"fit done in {meta['seconds']} s")
    return stats.with_fit(fit)


# tau candidates scored by KL: GRIFFIN, 8 .. 2048 prompt tokens, global only.
TAU_KL_GRID = (0.0, 8.0, 32.0, 64.0, 128.0, 256.0, 512.0, 2048.0, math.inf)


def json_float(x: float) -> float | str:
    """x, or "inf" (strict JSON has no infinity; float("inf") reads it back)."""
    return x if math.isfinite(x) else str(x)


def _spread_picks(n: int, want: int) -> set[int]:
    """``want`` of the indices 0..n-1, evenly spread (the batches are sorted by prompt length)."""
    want = min(n, max(1, want))
    return {round(i * (n - 1) / max(1, want - 1)) for i in range(want)}


def _rescale(layer: float, proxy: float, tau: float) -> float:
    """A layer's proxy tau relative to the all-layer proxy tau, applied to the KL-fitted tau
    (0 and inf stay: a layer where one ranking alone is best keeps that)."""
    if layer in (0.0, math.inf) or tau in (0.0, math.inf):
        return layer if tau not in (0.0, math.inf) else tau
    ref = min(max(proxy, TAU_GRID[1]), TAU_GRID[-2])  # a finite reference even if the proxy hit an end
    return float(tau * layer / ref)


def _fit_config(keep: float):
    """The patch config of the fit's own scoring: sets are forced, so the method only needs no stats;
    the separate layout and no tuning keep each patch cheap."""
    from .patch import GlassConfig

    return GlassConfig(method="griffin", keep=keep, layout="separate", tune=False)


def _aggregate_sets(ref, ranks, D: Sequence[int], lam: Callable[[int], torch.Tensor], k: float | Sequence[int],
                    only: int | None = None) -> list[torch.Tensor]:
    """Per layer [B, k_l] A-GLASS sets at per-row lambda ``lam(layer)`` from the reference's prompt
    statistics (``k``: a keep fraction for every layer, or neurons per layer); with ``only``, every
    other layer keeps all its neurons (it then runs dense)."""
    ks = [kept_neurons(k, d) for d in D] if isinstance(k, float) else list(k)
    out = []
    for l, d in enumerate(D):
        if only is not None and l != only:
            out.append(torch.arange(d, dtype=torch.int32)[None])  # one set shared by every row
            continue
        out.append(select_per_row(ref.prompt_stat[l], ranks[l], lam(l), ks[l]).to(torch.int32))
    return out


def _kl_sum(ref, logits: torch.Tensor) -> float:
    """Sum over the batch's scored tokens of KL(dense || these logits)."""
    from .evaluation.metrics import kl_per_token

    return float(sum(kl_per_token(ref.logits[b], logits[b]).sum() for b in range(logits.shape[0])))


class _KLScores:
    """Token-weighted KL of each (tau, keep) over the scored batches."""

    def __init__(self, taus, keeps) -> None:
        self.taus, self.keeps = list(taus), list(keeps)
        self.sums = {(t, k): 0.0 for t in self.taus for k in self.keeps}
        self.tokens = 0
        self.sequences = 0

    def score(self, model, batch, ref, ranks, D) -> None:
        from .evaluation.run import continuation_logits

        n = batch.mask.sum(1)
        for keep in self.keeps:
            for tau in self.taus:
                lam = lam_of_length(tau, n)
                sets = _aggregate_sets(ref, ranks, D, lambda l: lam, keep)
                logits = continuation_logits(model, batch, ref, _fit_config(keep), None, sets)
                self.sums[(tau, keep)] += _kl_sum(ref, logits)
        self.tokens += _tokens(ref)
        self.sequences += int(ref.logits.shape[0])

    def mean(self) -> dict[float, float]:
        """tau -> KL averaged over the keeps (each keep's mean KL per token)."""
        return {t: sum(self.sums[(t, k)] for k in self.keeps) / (len(self.keeps) * max(1, self.tokens))
                for t in self.taus}

    def best(self) -> float:
        m = self.mean()
        return min(self.taus, key=lambda t: m[t])


def _reference_batches(model, prompts, conts, pad):
    """(batch, reference pass) of each scored batch again, one at a time (the fit keeps only the
    sensitivity batches' passes in memory: each holds its prompt's KV cache and the logits). The
    caller deletes its ``ref`` at the end of each step, so that two passes never coexist."""
    from .evaluation.run import make_batch, reference_pass

    for ids, cont in zip(prompts, conts):
        batch = make_batch(ids, cont, pad)
        yield batch, reference_pass(model, batch, keep_prompt_cache=True)


def _tokens(ref) -> int:
    """Continuation tokens a reference pass scores."""
    return int(ref.logits.shape[0] * ref.logits.shape[1])


def _shrink_scores(model, stats, prompts, conts, pad, progress) -> dict[float, float]:
    """share -> token-weighted KL per token (averaged over FIT_KEEPS) of the whole model with the
    fit's per-layer keep applied by that share (``stats.fit``), λ(n) with the shared τ; ``prompts`` /
    ``conts``: the scored batches (their reference passes are made again, one batch at a time)."""
    from .evaluation.run import continuation_logits
    from .patch import GlassConfig

    sums = {(a, keep): 0.0 for a in SHRINK_GRID for keep in FIT_KEEPS}
    tokens = 0
    bar = _bar(len(prompts) * len(SHRINK_GRID) * len(FIT_KEEPS), "fit: per-layer keep share", progress)
    for batch, ref in _reference_batches(model, prompts, conts, pad):
        for a in SHRINK_GRID:
            shrunk = stats.with_fit(dataclasses.replace(stats.fit, keep_shrink=a))
            for keep in FIT_KEEPS:
                gcfg = GlassConfig(method="a-glass", keep=keep, lam="length", keep_split="fitted", tune=False,
                                   layout="separate")
                sums[(a, keep)] += _kl_sum(ref, continuation_logits(model, batch, ref, gcfg, shrunk))
                if bar is not None:
                    bar.update(1)
        tokens += _tokens(ref)
        del ref
    _close(bar)
    return {a: sum(sums[(a, k)] for k in FIT_KEEPS) / (len(FIT_KEEPS) * max(1, tokens)) for a in SHRINK_GRID}


def _layer_sensitivity(model, stats, refs, layer_tau, progress) -> dict[float, torch.Tensor]:
    """keep -> [L] mean KL per token of the output with only layer l sparse (A-GLASS, lambda_l(n))."""
    from .evaluation.run import continuation_logits

    L = stats.num_layers
    ranks = stats.ranks("activation")
    out = {keep: torch.zeros(L, dtype=torch.float64) for keep in SENSITIVITY_KEEPS}
    tokens = 0
    bar = _bar(len(refs) * L * len(SENSITIVITY_KEEPS), "fit: per-layer sensitivity", progress)
    for batch, ref in refs:
        n = batch.mask.sum(1)
        for keep in SENSITIVITY_KEEPS:
            for l in range(L):
                sets = _aggregate_sets(ref, ranks, stats.D, lambda layer: lam_of_length(layer_tau[layer], n), keep,
                                       only=l)
                logits = continuation_logits(model, batch, ref, _fit_config(keep), None, sets)
                out[keep][l] += _kl_sum(ref, logits)
                if bar is not None:
                    bar.update(1)
        tokens += _tokens(ref)
    _close(bar)
    return {keep: v / max(1, tokens) for keep, v in out.items()}


def plan_moves(gain: Sequence[float], cost: Sequence[float], max_moves: int) -> list[tuple[int, int]]:
    """(from, to) layer pairs of the refinement: the most valuable layers (KL gained per weight
    element by one more step of neurons, every layer sparse) paired with the cheapest (KL lost per
    element by one step less), best pairs first, while the gain exceeds the cost; a layer either
    gives or takes, once."""
    L = len(gain)
    takers = sorted(range(L), key=lambda l: -gain[l])
    givers = sorted(range(L), key=lambda l: cost[l])
    moves: list[tuple[int, int]] = []
    used: set[int] = set()
    t = g = 0
    while len(moves) < max_moves and t < L and g < L:
        if takers[t] in used:
            t += 1
        elif givers[g] in used or givers[g] == takers[t]:
            g += 1
        elif gain[takers[t]] <= cost[givers[g]]:
            break
        else:
            moves.append((givers[g], takers[t]))
            used |= {givers[g], takers[t]}
            t, g = t + 1, g + 1
    return moves


def _refine_step(D: int) -> int:
    """Neurons one step of the refinement moves in a layer of D."""
    return max(1, D // REFINE_STEPS)


def apply_moves(k: Sequence[int], moves, D: Sequence[int], row_elems: Sequence[int]) -> list[int]:
    """``k`` with each move's step (D_from / REFINE_STEPS neurons) taken from one layer and its weight
    elements given to the other (as many whole neurons as they pay for, at most D_to)."""
    out = list(k)
    for src, dst in moves:
        step = min(_refine_step(D[src]), out[src] - 1)
        out[src] -= step
        out[dst] = min(D[dst], out[dst] + step * row_elems[src] // row_elems[dst])
    return out


def _refine_allocation(model, stats, refs, checks, pad, row_elems, progress) -> tuple[torch.Tensor, dict]:
    """The joint-context refinement (fit_selection, step 6): per FIT_KEEPS, each layer's KL change
    per element for one step more and one step less of its neurons while every other layer stays at
    the fitted allocation (on the sensitivity prompts, ``refs``), and the moves :func:`plan_moves`
    picks. How many of them to apply (none, the best half, all) is chosen by the KL of other
    prompts, ``checks`` ([(prompts, continuations)] batches): moves measured on a few prompts can
    fit those prompts only (Gemma-3 at keep 0.3: -10% there, +3% on held-out prompts). Without
    ``checks`` the sensitivity prompts decide. Returns the [K, L] changes of kept fraction and the
    measurements (for the file's meta)."""
    from .evaluation.run import continuation_logits

    D, L = stats.D, stats.num_layers
    ranks = stats.ranks("activation")
    tokens = sum(_tokens(ref) for _, ref in refs)
    bar = _bar(len(FIT_KEEPS) * (len(refs) * (2 * L + 1) + len(checks) * 3), "fit: per-layer keep refinement",
               progress)

    def split_kl(batch, ref, k: list[int]) -> float:
        lam = lam_of_length(stats.fit.tau, batch.mask.sum(1))
        sets = _aggregate_sets(ref, ranks, D, lambda l: lam, k)
        if bar is not None:
            bar.update(1)
        return _kl_sum(ref, continuation_logits(model, batch, ref, _fit_config(0.5), None, sets))

    def kl(k: list[int]) -> float:
        return sum(split_kl(batch, ref, k) for batch, ref in refs) / max(1, tokens)

    def check_kl(splits: list[list[int]]) -> list[float]:
        """Each split's KL per token on the check prompts (one reference pass per batch)."""
        sums, n = [0.0] * len(splits), 0
        for batch, ref in _reference_batches(model, [p for p, _ in checks], [c for _, c in checks], pad):
            sums = [t + split_kl(batch, ref, k) for t, k in zip(sums, splits)]
            n += _tokens(ref)
            del ref
        return [t / max(1, n) for t in sums]

    rows, report = [], {}
    for keep in FIT_KEEPS:
        base = stats.fit.unrefined().layer_k(keep, D, row_elems)
        kl_base = kl(base)
        gain, cost = [], []
        for l in range(L):
            more, less = list(base), list(base)
            step = _refine_step(D[l])
            more[l] = min(D[l], base[l] + step)
            less[l] = max(1, base[l] - step)
            gain.append((kl_base - kl(more)) / max(1, (more[l] - base[l]) * row_elems[l]))
            cost.append((kl(less) - kl_base) / max(1, (base[l] - less[l]) * row_elems[l]) if less[l] < base[l]
                        else math.inf)
        moves = plan_moves(gain, cost, L // 3)
        counts = sorted({0, (len(moves) + 1) // 2, len(moves)})  # plan_moves lists the best pairs first
        splits = [apply_moves(base, moves[:n], D, row_elems) for n in counts]
        scored = check_kl(splits) if checks else [kl_base] + [kl(s) for s in splits[1:]]
        best = min(range(len(counts)), key=lambda i: (scored[i], counts[i]))  # a tie goes to fewer moves
        rows.append([(m - b) / d for m, b, d in zip(splits[best], base, D)])
        report[f"{keep:g}"] = {"kl_fitted": kl_base, "moves": moves, "applied_moves": counts[best],
                               "check_kl": {str(n): v for n, v in zip(counts, scored)}}
    _close(bar)
    return torch.tensor(rows, dtype=torch.float64), report


def refine_summary(keep: str, r: dict) -> str:
    """One keep's refinement in words, from the fit's meta (fits made before the check prompts
    record the sensitivity prompts' KL and whether all moves were applied)."""
    if "check_kl" not in r:
        return (f"keep {keep}: KL {r['kl_fitted']:.4f} -> {r['kl_refined']:.4f} by {len(r['moves'])} moves"
                + ("" if r["applied"] else ", not applied") + " (sensitivity prompts)")
    return (f"keep {keep}: {r['applied_moves']} of {len(r['moves'])} moves applied (check KL by moves: "
            + ", ".join(f"{n} {v:.4f}" for n, v in r["check_kl"].items()) + ")")


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True)


def _close(bar) -> None:
    if bar is not None:
        bar.close()
