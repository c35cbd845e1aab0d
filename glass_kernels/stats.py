"""Global (offline) neuron statistics of a model: :class:`GlobalStats`.

A ``GlobalStats`` holds, for every FFN layer of one model, the two global statistics of docs/method.md
("activation" and "impact"), each stored as the fp32 *sum of squares* of per-token normalised
activations over the calibration corpus (the statistic's square: the ranks are the same, and sums
accumulate across files or chunks).  It also carries metadata naming the model it belongs to, so that
stats of another model are rejected with :class:`StatsMismatchError` instead of silently selecting
meaningless neurons.

File format (``save`` / ``load``): one safetensors file.

* tensors ``activation.<layer>``, ``impact.<layer>``: fp32 [D_layer];
  ``fingerprint_sample.<layer>``: fp32 [n], a strided sample of the logical values of the layer's
  W_down (see :func:`model_signature`);
* header metadata (safetensors only allows ``str -> str``): every entry of :attr:`GlobalStats.meta`
  JSON-encoded under its own key, plus ``format = "glass_kernels.global_stats"`` and
  ``format_version``.

The model fingerprint does not depend on the storage layout (patching makes W_down neuron-major; the
logical [d, D] values are unchanged) nor on the dtype the model is loaded in: ``meta["fingerprint"]``
hashes the bf16-rounded sample (what a cache key needs), and :meth:`GlobalStats.check_model` falls back
to comparing the stored fp32 sample with a bf16-level tolerance when the hashes differ, so stats
computed on the fp32 model are accepted by the same model loaded in bf16 / fp16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .machine import software_versions

__all__ = [
    "GlobalStats",
    "StatsMismatchError",
    "StatsFileError",
    "model_signature",
    "KINDS",
    "FORMAT",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT = "glass_kernels.global_stats"
FORMAT_VERSION = 1
KINDS = ("activation", "impact")

# Fingerprint sample size per layer: 1024 values of W_down cost microseconds to gather and make an
# accidental match between two different weight sets impossible in practice.
_FINGERPRINT_SAMPLES = 1024
# Tolerance of the sample comparison when the hashes differ: the same weights loaded in fp16 / bf16
# instead of fp32 differ by at most half an ulp of bf16 (2^-8 relative); anything trained or
# re-initialised differs by O(1) relative.  4x the bf16 half-ulp keeps a wide margin on both sides.
_SAMPLE_RTOL = 2.0 ** -6
_SAMPLE_ATOL = 1e-6


class StatsMismatchError(ValueError):
    """The global statistics belong to another model (architecture, layers, d, D or weights differ)."""


class StatsFileError(ValueError):
    """A statistics file is missing, corrupt, or not a glass_kernels GlobalStats file."""


# --------------------------------------------------------------------------------------------------
# Model introspection (through the patch layer's FFN handler registry)
# --------------------------------------------------------------------------------------------------

def _ffn_sites(model: torch.nn.Module):
    from .ffn import find_ffn_sites  # lazy: ffn loads transformers-facing handlers

    sites = list(find_ffn_sites(model))
    sites.sort(key=lambda s: s.layer)
    return sites


def _strided_sample(w: torch.Tensor, n: int = _FINGERPRINT_SAMPLES) -> torch.Tensor:
    """``n`` values of the logical (row-major) flattening of ``w``, evenly strided, as fp32 on CPU.

    Indexes the logical view instead of reading the storage, so a transposed / neuron-major storage of
    the same matrix gives the same sample; no copy of the whole matrix is made.
    """
    w = w.detach()
    numel = w.numel()
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32)
    n = min(n, numel)
    # Offset by half a stride so the sample does not always start at element 0 (often special: a bias
    # -like first column or a zero-initialised row in synthetic models).
    flat = (torch.arange(n, dtype=torch.float64) * (numel / n) + (numel / n) / 2).floor().long()
    flat.clamp_(max=numel - 1)
    idx = torch.unravel_index(flat, tuple(w.shape))
    return w[tuple(i.to(w.device) for i in idx)].to(device="cpu", dtype=torch.float32).contiguous()


def _sample_hash(samples: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]]) -> str:
    """sha256 over the shapes and the bf16-rounded samples (dtype-independent for fp32/bf16 loads)."""
    h = hashlib.sha256()
    for shape, s in zip(shapes, samples):
        h.update(json.dumps(list(shape)).encode())
        h.update(s.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def _architecture(model: torch.nn.Module) -> dict[str, str]:
    cfg = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "model_type": str(getattr(cfg, "model_type", "") or ""),
    }


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies ``model`` for global statistics.

    Returns ``{"architecture", "model_type", "num_layers", "d": [..], "D": [..], "fingerprint",
    "samples": [fp32 tensors]}``.  ``d`` / ``D`` are per FFN layer (from the logical shape [d, D] of
    W_down given by the handler), ``samples`` are the per-layer fingerprint samples.
    """
    sites = _ffn_sites(model)
    downs = [site.handler.down_weight(site.module) for site in sites]
    for site, w in zip(sites, downs):
        if w.dim() != 2:
            raise ValueError(f"handler.down_weight of {site.name} must be 2-D [d, D], got {tuple(w.shape)}")
    arch = _architecture(model)
    return signature_of_ffn(arch["architecture"], arch["model_type"], downs)


def signature_of_ffn(architecture: str, model_type: str, down_weights: Sequence[torch.Tensor]) -> dict[str, Any]:
    """``model_signature`` from what identifies a model without its transformers module: the class
    name (e.g. "LlamaForCausalLM"), the config's model_type and every FFN layer's W_down as the
    logical [d, D] matrix (any storage: a transposed view samples the same values). Another stack
    serving the same checkpoint (the vLLM plugin) checks statistics with it."""
    ds, Ds, samples, shapes = [], [], [], []
    for w in down_weights:
        d, D = int(w.shape[0]), int(w.shape[1])
        ds.append(d)
        Ds.append(D)
        shapes.append((d, D))
        samples.append(_strided_sample(w))
    return {
        "architecture": architecture,
        "model_type": model_type,
        "num_layers": len(ds),
        "d": ds,
        "D": Ds,
        "fingerprint": _sample_hash(samples, shapes),
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------
# GlobalStats
# --------------------------------------------------------------------------------------------------

def _as_stat_list(name: str, values: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a list of 1-D tensors (one per layer), got a single tensor")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() != 1 or v.numel() == 0:
            raise ValueError(f"{name}[{i}] must be a non-empty 1-D tensor [D], got shape {tuple(v.shape)}")
        v = v.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(v).all():
            raise ValueError(f"{name}[{i}] contains NaN or Inf")
        if (v < 0).any():
            raise ValueError(f"{name}[{i}] must be a sum of squares (>= 0), found negative values")
        out.append(v)
    return out


@dataclass
class GlobalStats:
    """Per-layer global neuron statistics of one model (fp32 sums of squares), plus metadata.

    Args:
        activation: list (one per FFN layer, model order) of fp32 [D] sums of (h_i / ||h||)^2.
        impact: the same with h_i replaced by ||W_down[:, i]|| * h_i.
        meta: metadata (see module docstring). Keys used by :meth:`check_model`: ``architecture``,
            ``model_type``, ``num_layers``, ``d``, ``D``, ``fingerprint``; missing keys are not checked,
            so a bare ``GlobalStats(act, imp)`` built in a test only has its D checked against the model.
        num_tokens: number of calibration tokens accumulated.
        fingerprint_samples: optional per-layer fp32 samples of W_down (see :func:`model_signature`).
        fit: optional :class:`glass_kernels.adaptive.SelectionFit` (adaptive selection: λ by prompt
            length and layer, per-layer keep), made by ``fit_selection`` / ``calibrate --fit``.
    """

    activation: list[torch.Tensor]
    impact: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    num_tokens: int = 0
    fingerprint_samples: list[torch.Tensor] | None = None
    fit: Any = None

    def __post_init__(self) -> None:
        self.activation = _as_stat_list("activation", self.activation)
        self.impact = _as_stat_list("impact", self.impact)
        if len(self.activation) == 0:
            raise ValueError("activation must hold at least one layer")
        if len(self.activation) != len(self.impact):
            raise ValueError(
                f"activation has {len(self.activation)} layers but impact has {len(self.impact)}"
            )
        for i, (a, m) in enumerate(zip(self.activation, self.impact)):
            if a.shape != m.shape:
                raise ValueError(f"layer {i}: activation has D={a.numel()} but impact has D={m.numel()}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")
        self.meta = dict(self.meta)
        self.num_tokens = int(self.num_tokens)
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {self.num_tokens}")
        self.meta.setdefault("num_layers", len(self.activation))
        self.meta.setdefault("D", [int(a.numel()) for a in self.activation])
        self.meta["num_tokens"] = self.num_tokens
        if self.meta["num_layers"] != len(self.activation):
            raise ValueError(
                f"meta['num_layers']={self.meta['num_layers']} but {len(self.activation)} layers given"
            )
        if list(self.meta["D"]) != [int(a.numel()) for a in self.activation]:
            raise ValueError(f"meta['D']={self.meta['D']} does not match the tensors' sizes")
        if self.fingerprint_samples is not None:
            self.fingerprint_samples = [
                s.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
                for s in self.fingerprint_samples
            ]
            if len(self.fingerprint_samples) != len(self.activation):
                raise ValueError("fingerprint_samples must have one tensor per layer")
        if self.fit is not None and self.fit.num_layers != len(self.activation):
            raise ValueError(f"the selection fit has {self.fit.num_layers} layers, the statistics {len(self.activation)}")

    def with_fit(self, fit) -> "GlobalStats":
        """A copy that carries ``fit`` (a SelectionFit of the same model), replacing any earlier one."""
        import dataclasses

        return dataclasses.replace(self, meta=dict(self.meta), fit=fit)

    def require_fit(self, what: str):
        """The SelectionFit, or a ValueError naming ``what`` needs it and how to make one."""
        if self.fit is None:
            raise ValueError(
                f"{what} needs the adaptive-selection fit in the statistics file, and these statistics have "
                "none. Make one: `python -m glass_kernels calibrate --model M --fit` or "
                "glass_kernels.fit_selection(model, tokenizer, stats)."
            )
        return self.fit

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        activation: Sequence[torch.Tensor],
        impact: Sequence[torch.Tensor],
        num_tokens: int = 0,
        **meta: Any,
    ) -> "GlobalStats":
        """Wrap statistics computed on ``model`` with its full metadata (signature, versions).

        ``meta`` adds calibration details (``source``, ``num_sequences``, ``seq_len``, ``seed``, ...).
        """
        sig = model_signature(model)
        samples = sig.pop("samples")
        full = dict(sig)
        full["versions"] = software_versions()
        full.update(meta)
        stats = cls(list(activation), list(impact), full, num_tokens, samples)
        stats.check_model(model, _signature=dict(sig, samples=samples))
        return stats

    # ---- accessors ----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.activation)

    @property
    def D(self) -> list[int]:
        return [int(a.numel()) for a in self.activation]

    def sums(self, kind: str) -> list[torch.Tensor]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.activation if kind == "activation" else self.impact

    def ranks(self, kind: str) -> list[torch.Tensor]:
        """Per-layer int32 [D] ranks: 1 = most important (largest statistic), ties -> lower index."""
        return [stat_ranks(s) for s in self.sums(kind)]

    def __repr__(self) -> str:
        return (
            f"GlobalStats(layers={self.num_layers}, D={sorted(set(self.D))}, tokens={self.num_tokens}, "
            f"architecture={self.meta.get('architecture', '?')}, source={self.meta.get('source', '?')}, "
            f"fingerprint={self.meta.get('fingerprint', '?')})"
        )

    # ---- model check --------------------------------------------------------------------------

    def check_model(self, model: torch.nn.Module, *, _signature: dict | None = None) -> None:
        """Raise :class:`StatsMismatchError` naming what differs if these stats are not ``model``'s."""
        sig = _signature if _signature is not None else model_signature(model)
        m = self.meta
        problems = []
        for key in ("architecture", "model_type"):
            if m.get(key) and sig.get(key) and m[key] != sig[key]:
                problems.append(f"{key}: stats are for {m[key]!r}, model is {sig[key]!r}")
        if self.num_layers != sig["num_layers"]:
            problems.append(f"layers: stats have {self.num_layers} FFN layers, model has {sig['num_layers']}")
        else:
            if "d" in m and list(m["d"]) != list(sig["d"]):
                problems.append(f"d (hidden size): stats have {_short(m['d'])}, model has {_short(sig['d'])}")
            if self.D != list(sig["D"]):
                problems.append(f"D (FFN size): stats have {_short(self.D)}, model has {_short(sig['D'])}")
        if not problems and m.get("fingerprint") and m["fingerprint"] != sig["fingerprint"]:
            bad = self._differing_layers(sig["samples"])
            if bad is None:
                problems.append(
                    f"fingerprint: stats are for FFN weights {m['fingerprint']}, model has {sig['fingerprint']}"
                )
            elif bad:
                problems.append(
                    f"fingerprint: FFN weights differ (stats {m['fingerprint']}, model {sig['fingerprint']}; "
                    f"first differing layers {bad[:5]})"
                )
            else:
                # Same weights up to the rounding of a lower-precision load: accept.
                logger.debug("fingerprint hash differs but weight samples agree within bf16 rounding")
        if problems:
            raise StatsMismatchError(
                "global statistics do not belong to this model: " + "; ".join(problems)
                + ". Calibrate this model: glass_kernels.calibrate(model, tokenizer) or "
                "`python -m glass_kernels calibrate`."
            )

    def _differing_layers(self, model_samples: Sequence[torch.Tensor]) -> list[int] | None:
        if self.fingerprint_samples is None:
            return None
        bad = []
        for i, (a, b) in enumerate(zip(self.fingerprint_samples, model_samples)):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=_SAMPLE_RTOL, atol=_SAMPLE_ATOL):
                bad.append(i)
        return bad

    # ---- serialisation ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (tensors + JSON metadata in the header). Atomic (temp + rename)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        tensors = {}
        for i, (a, m) in enumerate(zip(self.activation, self.impact)):
            tensors[f"activation.{i}"] = a
            tensors[f"impact.{i}"] = m
        if self.fingerprint_samples is not None:
            for i, s in enumerate(self.fingerprint_samples):
                tensors[f"fingerprint_sample.{i}"] = s
        if self.fit is not None:
            tensors.update(self.fit.tensors())
        header = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        if self.fit is not None:
            header["fit"] = json.dumps(self.fit.meta)
        for k, v in self.meta.items():
            if k in header or k == "fit":
                raise ValueError(f"meta key {k!r} is reserved")
            try:
                header[k] = json.dumps(v)
            except TypeError as e:
                raise ValueError(f"meta[{k!r}] is not JSON-serialisable: {e}") from None
        header["checksum"] = _checksum(tensors, header)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> "GlobalStats":
        """Read a file written by :meth:`save`; with ``model``, also :meth:`check_model` it."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise StatsFileError(f"statistics file not found: {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                names = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in names}
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise StatsFileError(
                f"{path!r} is not a readable safetensors file ({type(e).__name__}: {e})"
            ) from None
        if header.get("format") != FORMAT:
            raise StatsFileError(
                f"{path!r} is not a glass_kernels GlobalStats file (header format={header.get('format')!r}, "
                f"expected {FORMAT!r})"
            )
        version = header.get("format_version")
        if version != str(FORMAT_VERSION):
            raise StatsFileError(
                f"{path!r} has GlobalStats format version {version!r}; this glass_kernels reads "
                f"{FORMAT_VERSION}. Recalibrate."
            )
        stored = header.get("checksum")
        if stored is not None and stored != _checksum(tensors, {k: v for k, v in header.items() if k != "checksum"}):
            raise StatsFileError(f"{path!r} is corrupt: its contents do not match the checksum in its header")
        meta = {}
        for k, v in header.items():
            if k in ("format", "format_version", "checksum"):
                continue
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                raise StatsFileError(f"{path!r}: metadata entry {k!r} is not valid JSON") from None
        n = 0
        while f"activation.{n}" in names:
            n += 1
        if n == 0:
            raise StatsFileError(f"{path!r} holds no 'activation.0' tensor")
        expected = {f"{kind}.{i}" for kind in KINDS for i in range(n)}
        missing = sorted(expected - names)
        if missing:
            raise StatsFileError(f"{path!r} is missing tensors {missing[:5]}")
        samples = None
        if "fingerprint_sample.0" in names:
            try:
                samples = [tensors[f"fingerprint_sample.{i}"] for i in range(n)]
            except KeyError as e:
                raise StatsFileError(f"{path!r} is missing tensor {e.args[0]!r}") from None
        from .adaptive import SelectionFit

        fit = None
        fit_names = set(SelectionFit.TENSOR_NAMES)
        optional_fit_names = set(SelectionFit.OPTIONAL_TENSOR_NAMES)
        if names & (fit_names | optional_fit_names):
            if not fit_names <= names:
                raise StatsFileError(f"{path!r} holds a partial selection fit (missing {sorted(fit_names - names)})")
            try:
                fit = SelectionFit.from_tensors(tensors, meta.pop("fit", {}))
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise StatsFileError(f"{path!r} holds an invalid selection fit: {e}") from None
        unknown = sorted(names - expected - fit_names - optional_fit_names - {f"fingerprint_sample.{i}" for i in range(n)})
        if unknown:
            raise StatsFileError(f"{path!r} holds unexpected tensors {unknown[:5]}")
        num_tokens = meta.pop("num_tokens", 0)
        try:
            stats = cls(
                [tensors[f"activation.{i}"] for i in range(n)],
                [tensors[f"impact.{i}"] for i in range(n)],
                meta,
                num_tokens,
                samples,
                fit,
            )
        except (ValueError, TypeError) as e:
            raise StatsFileError(f"{path!r} holds inconsistent statistics: {e}") from None
        if model is not None:
            stats.check_model(model)
        return stats


def stat_ranks(stat: torch.Tensor) -> torch.Tensor:
    """int32 [D] ranks of a [D] statistic: 1 = largest; ties -> lower index (the library's convention)."""
    # Stable descending sort keeps equal values in index order: the lower index ranks better.
    order = torch.sort(stat, descending=True, stable=True).indices
    r = torch.empty(stat.numel(), dtype=torch.int32)
    r[order] = torch.arange(1, stat.numel() + 1, dtype=torch.int32)
    return r


def _checksum(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> str:
    """sha256 over the header's entries and every tensor's name, dtype, shape and bytes (in name
    order): a flipped byte in the data or the metadata, which safetensors itself cannot notice, is
    then caught on load. Files written before the checksum existed have none and load as before."""
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _short(xs: Sequence[int]) -> str:
    xs = list(xs)
    if len(set(xs)) == 1:
        return f"{xs[0]} (x{len(xs)} layers)"
    return str(xs)
