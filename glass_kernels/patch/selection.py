"""How a patched model chooses its neurons once a prompt is complete (docs/method.md, "Two rankings,
one aggregate"). One small interface, ``Selection.choose``, and one class per kind of method:

* ``RankAggregation``: a-glass, i-glass and griffin: the prompt's local statistic aggregated with the
  global ranks at weight lam (griffin: lam = 0, the global ranks play no part);
* ``FixedSelection``: global and random: one set per layer, the same for every prompt;
* ``NoSelection``: dense.

Adaptive lambda (``lam="length"`` / ``"layer"``, glass_kernels.adaptive) is RankAggregation with a
per-row, per-layer lambda from the statistics' fit; per-layer keep only changes ``k``.
The schedule only calls ``choose``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .config import NEEDS_GLOBAL, GlassConfig


def _ops():
    from .. import ops  # lazy: the ops module loads the extension on first use

    return ops


class Selection:
    """Chooses per layer the int32 neuron sets [R, k] (R rows of statistics, or 1 for a set shared by
    every row), or None for "no selection" (dense decoding)."""

    needs_local = False  # whether choose() reads the prompt's local statistics

    def choose(self, local: Sequence[torch.Tensor] | None, device_of: Callable[[int], torch.device],
               tokens: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """``local``: per layer fp32 [R, D]; ``tokens``: int [R] prompt tokens behind each row."""
        raise NotImplementedError

    def choose_layer(self, layer: int, rows: torch.Tensor | None, tokens: torch.Tensor | None = None
                     ) -> torch.Tensor | None:
        """``choose`` for one layer: its set(s) [R, k] (or [1, k]) on ``rows``' device (CPU without
        rows). A server that sees each request's statistics layer by layer (the vLLM plugin) calls it."""
        raise NotImplementedError

    def nbytes(self) -> dict[str, int]:
        """Bytes this selection keeps per model (for memory_overhead)."""
        return {}


class NoSelection(Selection):
    def choose(self, local, device_of, tokens=None):
        return None

    def choose_layer(self, layer, rows, tokens=None):
        return None


class FixedSelection(Selection):
    """"global" (the k best global ranks: lam = 1) or "random" (seeded per layer): [1, k] per layer."""

    def __init__(self, config: GlassConfig, D: Sequence[int], k: Sequence[int],
                 global_ranks: Sequence[torch.Tensor] | None) -> None:
        self.config, self.D, self.k, self.global_ranks = config, list(D), k, global_ranks
        self._sets: dict[int, torch.Tensor] = {}

    def _set(self, layer: int) -> torch.Tensor:
        s = self._sets.get(layer)
        if s is None:
            D, k = self.D[layer], self.k[layer]
            if self.config.method == "random":
                g = torch.Generator().manual_seed(self.config.seed + layer)
                s = torch.randperm(D, generator=g)[:k].sort().values.to(torch.int32)
            else:  # "global": local scores irrelevant (all equal), lam = 1
                zeros = torch.zeros(1, D, dtype=torch.float32)
                s = _ops().select_neurons(zeros, self.global_ranks[layer].cpu(), 1.0, k)
            self._sets[layer] = s = s.reshape(1, k).contiguous()
        return s

    def choose(self, local, device_of, tokens=None):
        return [self._set(l).to(device_of(l)) for l in range(len(self.D))]

    def choose_layer(self, layer, rows, tokens=None):
        s = self._set(layer)
        return s if rows is None else s.to(rows.device)

    def nbytes(self):
        return {"fixed_sets": sum(t.numel() * t.element_size() for t in self._sets.values())}


class RankAggregation(Selection):
    """a(i) = lam * r_G(i) + (1 - lam) * r_L(i); the k smallest, per row of local statistics."""

    needs_local = True

    def __init__(self, config: GlassConfig, D: Sequence[int], k: Sequence[int],
                 global_ranks: list[torch.Tensor] | None, fit=None) -> None:
        self.lam = config.effective_lam  # a float, or "length" / "layer" (read from ``fit``)
        self.fit = fit
        self.D, self.k = list(D), k
        # The global ranks live with the weights (moved lazily if the model moves).
        self.global_ranks = global_ranks
        self._identity: dict[tuple, torch.Tensor] = {}

    def _ranks(self, layer: int, device: torch.device) -> torch.Tensor:
        if self.global_ranks is not None:
            r = self.global_ranks[layer]
            if r.device != device:
                r = self.global_ranks[layer] = r.to(device)
            return r
        # griffin: lam = 0, the global rank has weight 0; any permutation gives the same result.
        key = (self.D[layer], str(device))
        r = self._identity.get(key)
        if r is None:
            r = self._identity[key] = torch.arange(1, key[0] + 1, dtype=torch.int32, device=device)
        return r

    def choose(self, local, device_of, tokens=None):
        return [self.choose_layer(l, rows, tokens) for l, rows in enumerate(local)]

    def choose_layer(self, layer, rows, tokens=None):
        if rows is None:
            raise ValueError(f"{type(self).__name__} needs the prompt's local statistics")
        ranks = self._ranks(layer, rows.device)
        if isinstance(self.lam, str):
            if tokens is None:
                raise ValueError(f"lam={self.lam!r} needs the prompt's token counts")
            lams = self.fit.lam(tokens.cpu(), layer if self.lam == "layer" else None)
            idx = select_per_row(rows, ranks, lams, self.k[layer])
        else:
            idx = _ops().select_neurons(rows, ranks, self.lam, self.k[layer])
        return idx.to(torch.int32).contiguous()

    def nbytes(self):
        return {"global_ranks": sum(t.numel() * t.element_size() for t in self.global_ranks or [])}


def select_per_row(rows: torch.Tensor, ranks: torch.Tensor, lams: torch.Tensor, k: int) -> torch.Tensor:
    """[R, k] rank aggregation of each row of local statistics [R, D] at its own lambda (lams [R])."""
    return torch.cat([_ops().select_neurons(rows[r:r + 1].contiguous(), ranks, float(lams[r]), k)
                      for r in range(rows.shape[0])])


def make_selection(config: GlassConfig, D: Sequence[int], k: Sequence[int], stats) -> Selection:
    """The Selection of ``config.method`` for FFN layers of ``D`` neurons keeping ``k`` (stats: the
    GlobalStats, for the methods that need them)."""
    global_ranks = None
    if config.method in NEEDS_GLOBAL:
        kind = "impact" if config.method == "i-glass" else "activation"
        global_ranks = [r.to(torch.int32).contiguous() for r in stats.ranks(kind)]
    if config.method == "dense":
        return NoSelection()
    if config.method in ("global", "random"):
        return FixedSelection(config, D, k, global_ranks)
    return RankAggregation(config, D, k, global_ranks, stats.fit if config.adaptive else None)


def layer_k(config: GlassConfig, D: Sequence[int], row_elems: Sequence[int], stats) -> list[int]:
    """Neurons kept per layer of ``D`` neurons (``row_elems`` weights each): k = floor(keep * D)
    everywhere, or (keep_split="fitted") the fit's allocation of the same weight bytes
    (glass_kernels.adaptive.SelectionFit.layer_k)."""
    if config.keep_split == "fitted":
        fit = stats.require_fit("keep_split=\"fitted\"")
        return fit.layer_k(config.keep, list(D), list(row_elems))
    return [config.k_for(n) for n in D]
