"""GlassConfig: what `patch()` does to a model (method, sparsity, lambda, backend)."""

from __future__ import annotations

import dataclasses
import math

METHODS = ("a-glass", "i-glass", "griffin", "global", "random", "dense")
from ..backend import BACKENDS
STRATEGIES = ("gather", "compact", "auto")
LAYOUTS = ("auto", "separate", "bundled")
WEIGHTS = (None, "int8", "int4", "q8_0", "q4_0")
# Adaptive selection (glass_kernels.adaptive; needs the statistics' SelectionFit):
LAM_MODES = ("length", "layer")  # lam = tau / (tau + prompt tokens), one tau / one per layer
KEEP_SPLITS = ("uniform", "fitted")

# Methods whose selection needs the offline global statistics (GlobalStats).
NEEDS_GLOBAL = frozenset({"a-glass", "i-glass", "global"})
# Methods whose selection uses the prompt's local statistic.
NEEDS_LOCAL = frozenset({"a-glass", "i-glass", "griffin"})

# Project default for lambda (docs/method.md, "Aggregation"): the best (Gemma-3-270M) or tied best
# (SmolLM2) A-GLASS lambda of the sweep on the TUNE split of the prompt set, never the held-out one.
# The sweep's table and how to rerun it: README, "Default λ"; reports/eval/*/report.md.
DEFAULT_LAMBDA = 0.75


def kept_neurons(keep: float, D: int) -> int:
    """Neurons a layer of D keeps at fraction ``keep``: max(1, floor(keep * D)), at most D."""
    # A tiny epsilon so that e.g. keep = 0.7, D = 10 gives 7, not 6 (0.7 * 10 = 6.999...).
    return max(1, min(D, int(math.floor(keep * D + 1e-9))))


@dataclasses.dataclass(frozen=True)
class GlassConfig:
    """How a patched model chooses and uses its FFN neurons.

    method:  "a-glass" (activation statistic, local + global ranks), "i-glass" (impact statistic:
             activations scaled by ||W_down[:, i]||), "griffin" (local only, lam = 0), "global"
             (global only, lam = 1: one static set per layer), "random" (a seeded random set per
             layer, the same for every sequence), "dense" (no sparsity; the schedule and the local
             statistics still run, which is what evaluation code uses for oracles).
    keep:    fraction of each layer's D neurons kept: k = max(1, floor(keep * D)); in (0, 1].
    lam:     weight of the global rank in a(i) = lam * r_G(i) + (1 - lam) * r_L(i), in [0, 1].
             Only "a-glass" / "i-glass" read it ("griffin" forces 0, "global" forces 1).
             Adaptive (glass_kernels.adaptive, needs stats with a selection fit): "length" takes
             lam = tau / (tau + n) per sequence, n its prompt tokens, one fitted tau; "layer" the
             same with one fitted tau per layer.
    keep_split: how the FFN budget is split across layers: "uniform" (every layer keeps the fraction
             ``keep``) or "fitted" (per-layer fractions allocated from the fit's per-layer loss
             curves; the same weight bytes per decode step in total). Needs a selecting method.
    backend: "auto" | "cpp" | "triton" | "torch": which implementation of the ops runs.
    seed:    seed of the "random" method's sets (layer l uses seed + l).
    strategy: how the decode reads the selected neurons: "gather" (default) reads their rows in
             place, no copy; "compact" copies them once per prompt into contiguous buffers (keep x
             the FFN's bytes of extra memory, freed at the next prompt) and reads the copy; "auto"
             takes the copy only where the decode tuning measured it faster than in-place reads on
             this machine. A copy needs one neuron set for all rows (B = 1, or rows sharing a set);
             per-sequence sets always gather. ``session(model).strategy`` says which ran.
    layout:  the FFN weights' storage while patched (glass_kernels.ffn.layout; always in place, the
             parameters become views, ``unpatch`` restores the original bit for bit): "separate"
             (each operand [D, d]; W_down transposed), "bundled" (one [D, n, d] block per layer,
             neuron i's gate, up and down rows adjacent: one read per selected neuron), "auto"
             (bundled where the decode tuning measured it > 2% faster on this machine, else
             separate). Families whose FFN is one fused parameter (Phi-3) are always separate.
    weights: None (the model's own floats) or "int8" / "int4" (aliases of "q8_0" / "q4_0"): the FFN
             weights are quantized at patch time into neuron-bundled rows of ggml's Q8_0 / Q4_0
             blocks (glass_kernels.quant) and the float parameters released; decode reads the
             quantized rows, a prompt forward dequantizes one layer at a time; ``unpatch`` restores
             the parameters holding the dequantized values (the quantization error stays). Needs
             d % 32 == 0. The decode setting is measured on the quantized rows themselves (``tune``).
    tune:    the decode kernel's per-machine setting (ISA path, neurons in flight, prefetch; see
             glass_kernels.tuning): "auto" uses the setting cached for this CPU, and measures it
             (~0.5-3 s, once) when the model's FFN is large enough to time from DRAM; True measures
             whenever nothing is cached; False never measures (a cached setting is still used,
             else the C core's defaults / the environment's).
    """

    method: str = "a-glass"
    keep: float = 0.5
    lam: float = DEFAULT_LAMBDA
    backend: str = "auto"
    seed: int = 0
    strategy: str = "gather"
    tune: bool | str = "auto"
    layout: str = "auto"
    weights: str | None = None
    keep_split: str = "uniform"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise TypeError(f"keep must be a float in (0, 1], got {type(self.keep).__name__}")
        if not (0.0 < float(self.keep) <= 1.0) or math.isnan(self.keep):
            raise ValueError(f"keep must be in (0, 1], got {self.keep!r}")
        if isinstance(self.lam, str):
            if self.lam not in LAM_MODES:
                raise ValueError(f"lam must be a float in [0, 1] or one of {LAM_MODES}, got {self.lam!r}")
        elif isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)):
            raise TypeError(f"lam must be a float in [0, 1] or one of {LAM_MODES}, got {type(self.lam).__name__}")
        elif not (0.0 <= float(self.lam) <= 1.0):
            raise ValueError(f"lam must be in [0, 1], got {self.lam!r}")
        if self.keep_split not in KEEP_SPLITS:
            raise ValueError(f"keep_split must be one of {KEEP_SPLITS}, got {self.keep_split!r}")
        if self.keep_split == "fitted" and self.method not in NEEDS_LOCAL | NEEDS_GLOBAL:
            raise ValueError(f"keep_split=\"fitted\" needs a selecting method, not {self.method!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.tune not in (True, False, "auto"):
            raise ValueError(f"tune must be True, False or \"auto\", got {self.tune!r}")

    @property
    def effective_lam(self) -> float | str:
        """The lambda the selection really uses (griffin = 0, global = 1; "length" / "layer": fitted)."""
        if self.method == "griffin":
            return 0.0
        if self.method == "global":
            return 1.0
        return self.lam if isinstance(self.lam, str) else float(self.lam)

    @property
    def adaptive(self) -> bool:
        """Whether this config reads the statistics' selection fit."""
        return isinstance(self.effective_lam, str) or self.keep_split == "fitted"

    @property
    def local_kind(self) -> str:
        """Which local statistic the prompt accumulates: "impact" for i-glass, else "activation"."""
        return "impact" if self.method == "i-glass" else "activation"

    def k_for(self, D: int) -> int:
        """Neurons kept in a layer of D neurons: max(1, floor(keep * D))."""
        return kept_neurons(self.keep, D)

    def replace(self, **overrides) -> "GlassConfig":
        """A copy with some fields changed (unknown names -> TypeError naming them)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown GlassConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)
