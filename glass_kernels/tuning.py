"""Per-machine choice of the decode kernel's settings: which ISA path, how many selected neurons each
thread keeps in flight, and how far ahead their rows are prefetched.

Nothing here is a constant tuned on one CPU. The best setting depends on the memory system (a
2-core Xeon needs ~4 neurons in flight to reach STREAM bandwidth; other CPUs differ) and on the row
length and dtype, so it is *measured*: a short timing of every candidate on the model's own FFN
weights (cold caches: the model's FFN is cycled through, ~0.5-3 s), once per CPU model, dtype, row
length and thread count, cached on disk as JSON (``<cache>/tuning/<cpu>.json``).

Order of precedence for each setting: the environment (``GLASS_ISA``, ``GLASS_NEURONS_IN_FLIGHT``,
``GLASS_PREFETCH_NEURONS``: never overridden), then the cached or measured choice, then the C core's
defaults. ``patch(model, tune="auto")`` measures only for models whose FFN weights exceed the
last-level cache several times over (tiny test models keep the defaults); ``tune=True`` always
measures when nothing is cached, ``tune=False`` never does. ``python -m glass_kernels tune`` runs
the measurement on a real model and prints the table.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from .machine import cpu_name, cpu_sample, other_load, software_versions

logger = logging.getLogger("glass_kernels.tuning")

# Candidate (neurons in flight, prefetch distance in neurons). 1 = one neuron at a time, the token-tile
# path with its own one-neuron-ahead prefetch (the prefetch setting does not apply to it).
CANDIDATES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (4, 0), (4, 4), (4, 8), (8, 0), (8, 8))
ENV_VARS = ("GLASS_ISA", "GLASS_NEURONS_IN_FLIGHT", "GLASS_PREFETCH_NEURONS")
# patch(tune="auto") measures when the FFN weights are at least this many times the last-level cache:
# below that, repeated calls hit the cache and the timing says nothing about decoding from DRAM.
COLD_FACTOR = 4
# Other processes' CPU use (cores) above which a measurement is not cached: it would freeze noise.
BUSY_CORES = 0.25
_FORMAT = 2  # 2: compact-read candidates and "compact_faster"


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """One machine's decode setting for one (dtype, row length, threads)."""

    isa: str
    neurons_in_flight: int
    prefetch_neurons: int
    source: str  # "measured" | "cached" | "environment" | "default"
    gbps: dict | None = None  # candidate -> GB/s of selected weight bytes, when measured
    # The same kernel reading a compacted copy of the selected rows was more than 5% faster than
    # reading them in place (GlassConfig(strategy="auto") then copies).
    compact_faster: bool = False

    def describe(self) -> str:
        pf = "" if self.neurons_in_flight == 1 else f", prefetch {self.prefetch_neurons} neurons ahead"
        copy = "; a compacted copy reads faster here" if self.compact_faster else ""
        return f"{self.isa}, {self.neurons_in_flight} neuron(s) in flight{pf} ({self.source}{copy})"


def _ext():
    from . import _ext as ext

    return ext


def cache_file() -> Path:
    from .models import cache_dir

    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_name()).strip("-").lower() or "cpu"
    return cache_dir() / "tuning" / f"{slug}.json"


def _key(dtype: torch.dtype, d: int, threads: int) -> str:
    return f"{str(dtype).replace('torch.', '')}/d{d}/t{threads}"


def _load_cache(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a corrupt cache is re-measured, never trusted
        logger.warning("glass_kernels: ignoring unreadable tuning cache %s (%s)", path, e)
        return {}
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("cpu") != cpu_name():
        return {}
    return doc


def _env_overrides() -> dict:
    return {v: os.environ[v] for v in ENV_VARS if os.environ.get(v)}


def current() -> DecodeTuning:
    """The setting in force in the C core now (``source`` "default" unless something set it)."""
    C = _ext().require()
    g, p = C.get_decode_tuning()
    return DecodeTuning(C.get_isa(), g, p, "environment" if _env_overrides() else "default")


def apply(t: DecodeTuning) -> None:
    """Put ``t`` in force in the C core, leaving alone whatever the environment sets."""
    C = _ext().require()
    env = _env_overrides()
    if "GLASS_ISA" not in env:
        C.set_isa(t.isa)
    g, p = C.get_decode_tuning()
    C.set_decode_tuning(g if "GLASS_NEURONS_IN_FLIGHT" in env else t.neurons_in_flight,
                        p if "GLASS_PREFETCH_NEURONS" in env else t.prefetch_neurons)


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs); 32 MiB where it cannot be read."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    return best or (32 << 20)


def _isa_candidates() -> list[str]:
    """The vector paths worth timing against each other (scalar never wins where one exists)."""
    isas = [i for i in _ext().supported_isas() if i != "scalar"]
    return isas or ["scalar"]


def measure(layers: Sequence[tuple], dtype: torch.dtype, d: int, keep: float = 0.5, rounds: int = 5,
            seed: int = 0, compact: bool = False) -> dict[tuple, float]:
    """GB/s of selected weight bytes for every (isa, neurons in flight, prefetch) candidate.

    ``layers``: per FFN layer the gated operands (w_gate, w_up, w_down_t), each [D, d] contiguous in
    ``dtype``. One token, a sorted random set of keep * D neurons per layer; every timing walks all
    layers once (cold caches when they exceed the last-level cache), candidates interleaved round by
    round so that drift hits all alike; the median of ``rounds``. ``compact``: also time, per ISA,
    the same kernel reading k contiguous rows (what a compacted copy of the selection costs to read),
    keyed (isa, n, p, "compact").
    """
    C = _ext().require()
    _ext().sync_threads(C)
    dn = str(dtype).replace("torch.", "")
    g = torch.Generator().manual_seed(seed)
    D = int(layers[0][0].shape[0])
    k = max(1, int(keep * D))
    idx = [torch.randperm(D, generator=g)[:k].sort().values.to(torch.int32) for _ in layers]
    x = torch.randn(1, 1, d, generator=g).to(dtype)
    y = torch.empty_like(x)
    nbytes = 3 * k * d * x.element_size()
    saved_isa, saved = C.get_isa(), C.get_decode_tuning()
    cands = [(isa, nf, pf) for isa in _isa_candidates() for nf, pf in CANDIDATES]
    if compact:
        cands += [(isa, nf, pf, "compact") for isa in _isa_candidates() for nf, pf in ((1, 0), (4, 0))]
    contiguous = torch.arange(k, dtype=torch.int32)
    times: dict = {c: [] for c in cands}
    try:
        for _ in range(rounds + 1):  # the first round warms up (page faults, code) and is dropped
            for c in cands:
                C.set_isa(c[0])
                C.set_decode_tuning(c[1], c[2])
                sets = [contiguous] * len(idx) if len(c) == 4 else idx
                t0 = time.perf_counter()
                for (w1, w2, w3), i in zip(layers, sets):
                    C.sparse_ffn(dn, "silu", x.data_ptr(), 1, 1, d, w1.data_ptr(), w2.data_ptr(), w3.data_ptr(),
                                 D, i.data_ptr(), k, False, y.data_ptr())
                times[c].append((time.perf_counter() - t0) / len(layers))
    finally:
        C.set_isa(saved_isa)
        C.set_decode_tuning(*saved)
    return {c: nbytes / statistics.median(ts[1:]) / 1e9 for c, ts in times.items()}


def choose(gbps: dict[tuple, float]) -> tuple[str, int, int]:
    """The fastest in-place candidate; a simpler one (fewer in flight, no prefetch) wins ties within 2%."""
    gathered = {c: v for c, v in gbps.items() if len(c) == 3}
    best = max(gathered.values())
    close = [c for c, v in gathered.items() if v >= 0.98 * best]
    return min(close, key=lambda c: (c[1], c[2], -gathered[c]))


def compact_is_faster(gbps: dict[tuple, float]) -> bool:
    """Whether reading a compacted copy beat the best in-place candidate by more than 5%."""
    copies = [v for c, v in gbps.items() if len(c) == 4]
    return bool(copies) and max(copies) > 1.05 * gbps[choose(gbps)]


def _gated_layers(sites) -> list[tuple]:
    out = []
    for s in sites:
        if s.handler.kind != "gated":
            return []
        ops = tuple(s.handler.weights(s.module))
        out.append(ops[:3])
    return out


def tuning_for_model(sites, tune: bool | str = "auto", keep: float = 0.5, force: bool = False) -> DecodeTuning:
    """The decode setting for a patched model's FFN sites: cached, measured or the defaults.

    ``force``: measure again even when a setting is cached (``python -m glass_kernels tune``)."""
    if tune not in (True, False, "auto"):
        raise ValueError(f"tune must be True, False or \"auto\", got {tune!r}")
    ext = _ext()
    if not ext.available() or not sites:
        return DecodeTuning("none", 1, 0, "default")
    w = sites[0].handler.in_weight(sites[0].module)
    dtype, d = w.dtype, int(sites[0].d)
    threads = torch.get_num_threads()  # the ops run the core with torch's thread count
    path = cache_file()
    doc = _load_cache(path)
    entry = doc.get("entries", {}).get(_key(dtype, d, threads))
    supported = set(ext.supported_isas())
    if entry and entry.get("isa") in supported and not force:
        return DecodeTuning(entry["isa"], int(entry["neurons_in_flight"]), int(entry["prefetch_neurons"]),
                            "cached", entry.get("gbps"), bool(entry.get("compact_faster", False)))
    layers = _gated_layers(sites)
    ffn_bytes = sum(sum(t.numel() * t.element_size() for t in l) for l in layers)
    cold = ffn_bytes >= COLD_FACTOR * last_level_cache_bytes()
    if tune is False or not layers or w.device.type != "cpu" or (tune == "auto" and not cold):
        return current()
    t0 = time.perf_counter()
    before = cpu_sample()
    gbps = measure(layers, dtype, d, keep=keep, compact=True)
    busy = other_load(before, cpu_sample())
    isa, nf, pf = choose(gbps)
    faster_copy = compact_is_faster(gbps)
    table = {"/".join(str(part) for part in c): round(v, 2) for c, v in gbps.items()}
    logger.info("glass_kernels: decode tuning measured in %.1f s: %s, %d in flight, prefetch %d",
                time.perf_counter() - t0, isa, nf, pf)
    if busy is not None and busy > BUSY_CORES:
        # A choice made while other processes competed for the memory system is noise: use it for
        # this model, but do not keep it (the next patch on a quiet machine measures again).
        logger.warning("glass_kernels: other processes used %.2f cores while the decode setting was measured; "
                       "using it now but not caching it (`python -m glass_kernels tune` on a quiet machine)", busy)
        return DecodeTuning(isa, nf, pf, "measured on a busy machine, not cached", table, faster_copy)
    doc = doc or {"format": _FORMAT, "cpu": cpu_name(), "entries": {}}
    doc["entries"][_key(dtype, d, threads)] = {
        "isa": isa, "neurons_in_flight": nf, "prefetch_neurons": pf, "gbps": table,
        "compact_faster": faster_copy, "other_load_cores": None if busy is None else round(busy, 3),
        "ffn_bytes": ffn_bytes, "cold": cold, "keep": keep,
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": software_versions(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a re-measurement next time, nothing else
        logger.warning("glass_kernels: could not write the tuning cache %s (%s)", path, e)
    return DecodeTuning(isa, nf, pf, "measured", table, faster_copy)
