"""Per-machine choice of the decode kernel's settings: which ISA path, how many selected neurons each
thread keeps in flight, how far ahead their rows are prefetched, and which weight layout they are
read from (separate [D, d] operands or the neuron-bundled [D, n, d] block, glass_kernels.ffn.layout);
and whether the prompt's dense forward should run on contiguous copies of the relaid weights.

Nothing here is a constant tuned on one CPU. The best setting depends on the memory system (a
2-core Xeon needs ~4 neurons in flight to reach STREAM bandwidth; other CPUs differ) and on the row
length and dtype, so it is *measured*: a short timing of every candidate on the model's own FFN
weights (the model's whole FFN is cycled through, as a decode step does, ~0.5-3 s), once per CPU model, dtype, row
length and thread count, cached on disk as JSON (``<cache>/tuning/<cpu>.json``).

Order of precedence for each setting: the environment (``GLASS_ISA``, ``GLASS_NEURONS_IN_FLIGHT``,
``GLASS_PREFETCH_NEURONS``: never overridden), then the cached or measured choice, then the C core's
defaults. ``patch(model, tune="auto")`` measures only for models whose FFN weights are at least
``MIN_MEASURED_FFN_BYTES`` (tiny test models keep the defaults); ``tune=True`` always
measures when nothing is cached, ``tune=False`` never does. ``python -m glass_kernels tune`` runs
the measurement on a real model and prints the table.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import logging
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .machine import cpu_name, cpu_sample, other_load, software_versions

logger = logging.getLogger("glass_kernels.tuning")

# Candidate (neurons in flight, prefetch distance in neurons). 1 = one neuron at a time, the token-tile
# path with its own one-neuron-ahead prefetch (the prefetch setting does not apply to it). Every group
# size also runs with a prefetch distance of 4 since the prefetch is interleaved with the loads (commit
# 8c3d33f; on the Zen 4, (2, 4) read 10% more than (4, 4) on Q8_0 576x1536 rows).
CANDIDATES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 4), (4, 0), (4, 4), (4, 8), (8, 0), (8, 4), (8, 8))
ENV_VARS = ("GLASS_ISA", "GLASS_NEURONS_IN_FLIGHT", "GLASS_PREFETCH_NEURONS")
# patch(tune="auto") measures models whose FFN weights are at least this large. The measurement walks
# every layer of the model's own FFN, as a decode step does, so whether those weights fit the cache or
# not, it sees what decoding sees; only toy models (test models, where per-call overhead dominates)
# are not worth the seconds. (It used to ask for 4x the last-level cache; a VM reports its host's L3,
# 480 MiB on the Xeon, so SmolLM2 was never tuned there and decoded 3-6% slower.)
MIN_MEASURED_FFN_BYTES = 64 << 20
# Other processes' CPU use (cores) above which a measurement is not cached: it would freeze noise.
BUSY_CORES = 0.25
_FORMAT = 3  # 2: compact-read candidates and "compact_faster"; 3: layouts, prompt-copy entries
# Settings measured on a busy machine in this process, by cache key: not written to disk (noise), but
# not measured again at every patch either (a demo patching a model 30 times on a loaded machine
# spent most of its time re-measuring, with the same warning each time).
_BUSY_SETTINGS: dict[tuple[str, str], object] = {}  # (cache file, key) -> setting
_BUSY_SOURCE = "measured on a busy machine earlier in this process, not cached"
LAYOUTS = ("auto", "separate", "bundled")
# The bundled layout is taken only when it measured clearly faster: otherwise the parameters keep
# the layout closest to the original.
BUNDLED_MARGIN = 1.02


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
    layout: str = "separate"  # the weight layout the decode reads: "separate" | "bundled"

    def describe(self) -> str:
        pf = "" if self.neurons_in_flight == 1 else f", prefetch {self.prefetch_neurons} neurons ahead"
        copy = "; a compacted copy reads faster here" if self.compact_faster else ""
        return (f"{self.isa}, {self.neurons_in_flight} neuron(s) in flight{pf}, {self.layout} rows "
                f"({self.source}{copy})")


def _ext():
    from . import _ext as ext

    return ext


def cache_file() -> Path:
    from .models import cache_dir

    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_name()).strip("-").lower() or "cpu"
    return cache_dir() / "tuning" / f"{slug}.json"


def _key(dtype: torch.dtype, d: int, threads: int, layout: str = "separate") -> str:
    # the threading (the core's pool or torch's OpenMP team) is part of what was measured
    return f"{str(dtype).replace('torch.', '')}/d{d}/t{threads}/{layout}/{_ext().threading() or 'none'}"


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


def _isa_candidates(kernel_name: Callable[[], str] | None = None) -> list[str]:
    """The vector paths worth timing against each other (scalar never wins where one exists), one per
    kernel: ``kernel_name()`` names the current path's kernel for the rows being tuned, and a path
    whose kernel an earlier candidate runs already is not timed again (avx512_ext and neon_ext run
    the plain path's kernel for the dtypes they have no extension kernel for)."""
    isas = [i for i in _ext().supported_isas() if i != "scalar"] or ["scalar"]
    if kernel_name is None:
        return isas
    C = _ext().require()
    saved, seen, out = C.get_isa(), set(), []
    try:
        for isa in isas:
            C.set_isa(isa)
            name = kernel_name()
            if name not in seen:
                seen.add(name)
                out.append(isa)
    finally:
        C.set_isa(saved)
    return out


def interleaved_median_s(fns: Sequence[Callable[[], object]], rounds: int,
                         before: Callable[[int], object] | None = None,
                         clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median seconds of each of ``fns`` over ``rounds`` rounds, the functions alternating within
    each round so that drift (the host's load, another process starting) hits them alike; a first
    round (page faults, code, thread wake-up) is run and dropped. ``before(i)``, if given, runs
    untimed just before ``fns[i]`` (to put its setting in force)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds + 1):
        for i, (fn, ts) in enumerate(zip(fns, times)):
            if before is not None:
                before(i)
            t0 = clock()
            fn()
            ts.append(clock() - t0)
    return [statistics.median(ts[1:]) for ts in times]


def _time_candidates(cands: list[tuple], walk, rounds: int) -> dict[tuple, float]:
    """Median seconds of ``walk(c)`` (one pass over every layer) per candidate (isa, in flight,
    prefetch, ...), each timed with its setting in force in the core (interleaved_median_s). The
    core's ISA and setting are restored afterwards."""
    C = _ext().require()
    saved_isa, saved = C.get_isa(), C.get_decode_tuning()

    def setting(i: int) -> None:
        C.set_isa(cands[i][0])
        C.set_decode_tuning(cands[i][1], cands[i][2])

    try:
        medians = interleaved_median_s([functools.partial(walk, c) for c in cands], rounds, before=setting)
    finally:
        C.set_isa(saved_isa)
        C.set_decode_tuning(*saved)
    return dict(zip(cands, medians))


def measure(layers: Sequence[tuple], dtype: torch.dtype, d: int, keep: float = 0.5, rounds: int = 5,
            seed: int = 0, compact: bool = False) -> dict[tuple, float]:
    """GB/s of selected weight bytes for every (isa, neurons in flight, prefetch) candidate.

    ``layers``: per FFN layer the gated operands (w_gate, w_up, w_down_t), each [D, d] in ``dtype``
    with contiguous rows one common stride apart (separate or bundled, see glass_kernels.ffn.layout).
    One token, a sorted random set of keep * D neurons per layer; every timing walks all layers once
    (cold caches where they exceed the last-level cache, as in decoding), timed by
    ``_time_candidates`` (median of ``rounds``). ``compact``: also time, per ISA,
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
    isas = _isa_candidates(lambda: C.kernel_name(dn, True))
    cands = [(isa, nf, pf) for isa in isas for nf, pf in CANDIDATES]
    if compact:
        cands += [(isa, nf, pf, "compact") for isa in isas for nf, pf in ((1, 0), (4, 0))]
    contiguous = torch.arange(k, dtype=torch.int32)

    def walk(c) -> None:
        sets = [contiguous] * len(idx) if len(c) == 4 else idx
        for (w1, w2, w3), i in zip(layers, sets):
            C.sparse_ffn(dn, "silu", x.data_ptr(), 1, 1, d, w1.data_ptr(), w2.data_ptr(), w3.data_ptr(),
                         D, i.data_ptr(), k, False, y.data_ptr(), w1.stride(0))

    return {c: nbytes * len(layers) / s / 1e9 for c, s in _time_candidates(cands, walk, rounds).items()}


def _simplest_best(gbps: dict[tuple, float], keys: list[tuple]) -> tuple | None:
    """The fastest of ``keys``; a simpler one (fewer in flight, no prefetch) wins ties within 2%."""
    if not keys:
        return None
    best = max(gbps[c] for c in keys)
    close = [c for c in keys if gbps[c] >= 0.98 * best]
    return min(close, key=lambda c: (c[1], c[2], -gbps[c]))


def _busy_setting(path: Path, key: str):
    """The setting measured on a busy machine earlier in this process under ``key``, or None."""
    return _BUSY_SETTINGS.get((str(path), key))


def _used_not_cached(path: Path, key: str, setting):
    """``setting``, measured on a busy machine: kept for this process only (its source says so), then
    returned with the source "measured on a busy machine, not cached"."""
    _BUSY_SETTINGS[(str(path), key)] = dataclasses.replace(setting, source=_BUSY_SOURCE)
    return dataclasses.replace(setting, source="measured on a busy machine, not cached")


def choose_quantized(gbps: dict[tuple, float]) -> tuple[str, int, int]:
    """(isa, neurons in flight, prefetch) for quantized rows, from ``measure_quantized``'s timings."""
    return _simplest_best(gbps, list(gbps))


def choose(gbps: dict[tuple, float]) -> tuple[str, int, int, str]:
    """(isa, neurons in flight, prefetch, layout): the fastest in-place candidate of each layout
    (keys (isa, n, p) read separate rows, (isa, n, p, "bundled") the bundled block); the bundled
    layout only when it beat the best separate one by BUNDLED_MARGIN."""
    sep = _simplest_best(gbps, [c for c in gbps if len(c) == 3])
    bun = _simplest_best(gbps, [c for c in gbps if len(c) == 4 and c[3] == "bundled"])
    if bun is not None and (sep is None or gbps[bun] > BUNDLED_MARGIN * gbps[sep]):
        return (*bun[:3], "bundled")
    return (*sep[:3], "separate")


def _chosen_key(choice: tuple) -> tuple:
    return choice[:3] if choice[3] == "separate" else choice


def compact_is_faster(gbps: dict[tuple, float]) -> bool:
    """Whether reading a compacted copy beat the best in-place candidate by more than 5%."""
    copies = [v for c, v in gbps.items() if len(c) == 4 and c[3] == "compact"]
    return bool(copies) and max(copies) > 1.05 * gbps[_chosen_key(choose(gbps))]


def bundle_params(sites) -> list | None:
    """Per site the parameters of the bundled layout, or None if some site cannot be bundled."""
    out = [s.handler.bundle_params(s.module) for s in sites]
    return None if any(p is None for p in out) else out


def set_layout(sites, layout: str) -> None:
    """Give every site's FFN weights the ``layout`` ("separate" | "bundled") in place, a layer at a time."""
    from .ffn import layout as L

    for params in bundle_params(sites) or []:
        if layout == "bundled":
            if not L.is_bundled(params):
                L.bundle(params)
        elif L.is_bundled(params):
            L.separate(params)


def measure_layouts(sites, dtype: torch.dtype, d: int, layouts: Sequence[str], keep: float = 0.5,
                    rounds: int = 5) -> dict[tuple, float]:
    """``measure`` in each of ``layouts``, converting the sites' weights in place between them.

    With two layouts the phases alternate (separate, bundled, separate, bundled; ``rounds`` split
    among them) so that drift of the machine hits both alike; a candidate's figure is the mean of
    its phase medians. Bundled candidates are keyed (isa, n, p, "bundled"). The sites are left in
    the last layout measured."""
    phases = list(layouts) * 2 if len(layouts) > 1 else list(layouts)
    per_phase = max(1, rounds // len(phases) + (1 if len(phases) > 1 else 0))
    got: dict[tuple, list] = {}
    for lay in phases:
        set_layout(sites, lay)
        g = measure(_gated_layers(sites), dtype, d, keep=keep, rounds=per_phase, compact=lay == "separate")
        for c, v in g.items():
            got.setdefault(c + ("bundled",) if lay == "bundled" else c, []).append(v)
    return {c: statistics.mean(v) for c, v in got.items()}


def _gated_layers(sites) -> list[tuple]:
    out = []
    for s in sites:
        if s.handler.kind != "gated":
            return []
        ops = tuple(s.handler.weights(s.module))
        out.append(ops[:3])
    return out


def _remember(path: Path, doc: dict | None, key: str, entry: dict) -> None:
    """Store one measurement under ``key`` in the cache file (``doc``: its current contents), with
    when it was measured, the software versions and the build of the core that was measured."""
    doc = doc or {"format": _FORMAT, "cpu": cpu_name(), "entries": {}}
    doc.setdefault("entries", {})[key] = dict(
        entry, measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=software_versions(), build=_ext().build_id())
    _write_cache(path, doc)


def _write_cache(path: Path, doc: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a re-measurement next time, nothing else
        logger.warning("glass_kernels: could not write the tuning cache %s (%s)", path, e)


def _ffn_bytes(sites) -> int:
    return sum(sum(t.numel() * t.element_size() for t in s.handler.weights(s.module)
                   if isinstance(t, torch.Tensor)) for s in sites)


def _layout_mode(sites, layout: str) -> str:
    """What the layout request means for these sites: "auto" | "separate" | "bundled"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "separate" and bundle_params(sites) is None:
        if layout == "bundled":
            names = sorted({type(s.module).__name__ for s in sites if s.handler.bundle_params(s.module) is None})
            raise ValueError(f"layout=\"bundled\" is not possible for {', '.join(names)}: its weights are a fused "
                             "parameter that one [D, n, d] block cannot hold as views; use layout=\"separate\"")
        return "separate"
    return layout


def _entry(doc: dict, key: str) -> dict | None:
    """The cached entry under ``key`` if this very build of the core measured it: a measurement of
    other kernels (an older or newer build) says nothing about these."""
    entry = doc.get("entries", {}).get(key)
    if not isinstance(entry, dict) or entry.get("build") != _ext().build_id():
        return None
    return entry


def _cached_entry(doc: dict, key: str, layout: str) -> DecodeTuning | None:
    entry = _entry(doc, key)
    if not entry or entry.get("isa") not in set(_ext().supported_isas()):
        return None
    return DecodeTuning(entry["isa"], int(entry["neurons_in_flight"]), int(entry["prefetch_neurons"]),
                        "cached", entry.get("gbps"), bool(entry.get("compact_faster", False)),
                        entry.get("layout", layout))


def cached(dtype: torch.dtype, d: int, layout: str = "separate") -> DecodeTuning | None:
    """The setting cached on this CPU for rows of ``dtype`` and width ``d`` in ``layout`` at torch's
    thread count (None if nothing is cached). For servers that lay the weights out themselves."""
    if not _ext().available():
        return None
    return _cached_entry(_load_cache(cache_file()), _key(dtype, d, torch.get_num_threads(), layout), layout)


def tuning_for_model(sites, tune: bool | str = "auto", keep: float = 0.5, force: bool = False,
                     layout: str = "auto") -> DecodeTuning:
    """The decode setting for a patched model's FFN sites: cached, measured or the defaults.

    ``layout``: "separate" / "bundled" fix the weight layout, "auto" measures both and takes the
    bundled one where it reads clearly faster (BUNDLED_MARGIN). Measuring converts the sites' weights
    between the layouts in place; the caller then applies ``result.layout`` (``set_layout``).
    ``force``: measure again even when a setting is cached (``python -m glass_kernels tune``)."""
    if tune not in (True, False, "auto"):
        raise ValueError(f"tune must be True, False or \"auto\", got {tune!r}")
    ext = _ext()
    mode = _layout_mode(sites, layout) if sites else "separate"
    fixed = "separate" if mode == "auto" else mode  # the layout when nothing is measured or cached
    if not ext.available() or not sites:
        return DecodeTuning("none", 1, 0, "default", layout=fixed)
    w = sites[0].handler.in_weight(sites[0].module)
    dtype, d = w.dtype, int(sites[0].d)
    threads = torch.get_num_threads()  # the ops run the core with torch's thread count
    path = cache_file()
    doc = _load_cache(path)
    key = _key(dtype, d, threads, mode)
    hit = _cached_entry(doc, key, fixed)
    if hit is not None and not force:
        return hit
    busy_hit = _busy_setting(path, key)
    if busy_hit is not None and not force:
        return busy_hit
    layers = _gated_layers(sites)
    big = _ffn_bytes(sites) >= MIN_MEASURED_FFN_BYTES
    if tune is False or not layers or w.device.type != "cpu" or (tune == "auto" and not big):
        c = current()
        return dataclasses.replace(c, layout=fixed)
    t0 = time.perf_counter()
    before = cpu_sample()
    gbps = measure_layouts(sites, dtype, d, ("separate", "bundled") if mode == "auto" else (mode,), keep=keep)
    busy = other_load(before, cpu_sample())
    isa, nf, pf, lay = choose(gbps)
    faster_copy = compact_is_faster(gbps)
    table = {"/".join(str(part) for part in c): round(v, 2) for c, v in gbps.items()}
    logger.info("glass_kernels: decode tuning measured in %.1f s: %s, %d in flight, prefetch %d, %s rows",
                time.perf_counter() - t0, isa, nf, pf, lay)
    if busy is not None and busy > BUSY_CORES:
        # A choice made while other processes competed for the memory system is noise: use it for
        # this model, but do not keep it (the next patch on a quiet machine measures again).
        logger.warning("glass_kernels: other processes used %.2f cores while the decode setting was measured; "
                       "using it in this process but not caching it (`python -m glass_kernels tune` on a quiet "
                       "machine)", busy)
        return _used_not_cached(path, key, DecodeTuning(isa, nf, pf, "", table, faster_copy, lay))
    _remember(path, doc, key, {
        "isa": isa, "neurons_in_flight": nf, "prefetch_neurons": pf, "layout": lay, "gbps": table,
        "compact_faster": faster_copy, "other_load_cores": None if busy is None else round(busy, 3),
        "ffn_bytes": _ffn_bytes(sites), "keep": keep,
    })
    return DecodeTuning(isa, nf, pf, "measured", table, faster_copy, lay)


# -- quantized rows --------------------------------------------------------------------------------

def measure_quantized(layers: Sequence[tuple], wtype: str, d: int, keep: float = 0.5, rounds: int = 5,
                      seed: int = 0) -> dict[tuple, float]:
    """GB/s of quantized bytes per (isa, neurons in flight, prefetch) for sparse_ffn_q over ``layers``
    ((w_gate, w_up, w_down_t) uint8 rows one common stride apart), fp32 activations, as ``measure``."""
    from . import quant

    C = _ext().require()
    _ext().sync_threads(C)
    g = torch.Generator().manual_seed(seed)
    D = int(layers[0][0].shape[0])
    k = max(1, int(keep * D))
    idx = [torch.randperm(D, generator=g)[:k].sort().values.to(torch.int32) for _ in layers]
    x = torch.randn(1, 1, d, generator=g)
    y = torch.empty_like(x)
    ldw = layers[0][0].stride(0) // quant.block_bytes(wtype) * quant.BLOCK
    nbytes = 3 * k * quant.row_bytes(wtype, d)
    cands = [(isa, nf, pf) for isa in _isa_candidates(lambda: C.qkernel_name(wtype)) for nf, pf in CANDIDATES]

    def walk(c) -> None:
        for (w1, w2, w3), i in zip(layers, idx):
            C.sparse_ffn_q(wtype, "float32", "silu", x.data_ptr(), 1, 1, d, w1.data_ptr(), w2.data_ptr(),
                           w3.data_ptr(), ldw, D, i.data_ptr(), k, False, y.data_ptr())

    return {c: nbytes * len(layers) / s / 1e9 for c, s in _time_candidates(cands, walk, rounds).items()}


def tuning_for_quantized(qffns, wtype: str, tune: bool | str = "auto", keep: float = 0.5) -> DecodeTuning:
    """The decode setting for quantized rows (patch(weights=...)): cached, measured on the model's own
    rows, or the core's current one, as ``tuning_for_model`` does for float rows (same size floor,
    on the rows' bytes; the same busy-machine rule)."""
    ext = _ext()
    if not ext.available() or not qffns or qffns[0].device.type != "cpu":
        return DecodeTuning("none", 1, 0, "default", layout="bundled") if not ext.available() else current()
    d = int(qffns[0].site.d)
    key = f"{_key(torch.float32, d, torch.get_num_threads(), 'bundled')}/{wtype}"
    path = cache_file()
    doc = _load_cache(path)
    cached_setting = _cached_entry(doc, key, "bundled")
    if cached_setting is not None:
        return cached_setting
    busy_hit = _busy_setting(path, key)
    if busy_hit is not None:
        return busy_hit
    gated = all(len(q.rows) == 3 for q in qffns)
    nbytes = sum(q.nbytes for q in qffns)
    if tune is False or not gated or (tune == "auto" and nbytes < MIN_MEASURED_FFN_BYTES):
        return dataclasses.replace(current(), layout="bundled")
    before = cpu_sample()
    gbps = measure_quantized([tuple(q.rows) for q in qffns], wtype, d, keep=keep)
    busy = other_load(before, cpu_sample())
    isa, nf, pf = choose_quantized(gbps)
    table = {"/".join(str(part) for part in c): round(v, 2) for c, v in gbps.items()}
    if busy is not None and busy > BUSY_CORES:
        return _used_not_cached(path, key, DecodeTuning(isa, nf, pf, "", table, False, "bundled"))
    _remember(path, doc, key, {
        "isa": isa, "neurons_in_flight": nf, "prefetch_neurons": pf, "layout": "bundled", "gbps": table,
        "other_load_cores": None if busy is None else round(busy, 3), "ffn_bytes": nbytes, "keep": keep,
    })
    return DecodeTuning(isa, nf, pf, "measured", table, False, "bundled")


# -- the prompt's dense forward on relaid weights -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptCopy:
    """From how many tokens a dense FFN forward runs on contiguous copies of the relaid weights.

    A copy costs about the same for any number of tokens; a slow GEMM path on the views costs per
    token. So the choice is a token count: forwards of at least ``min_tokens`` rows copy."""

    min_tokens: float  # 0: always copy; inf: never
    source: str  # "measured" | "cached" | "default" | "not relaid"
    ms: dict | None = None  # measured: {"view": [ms at 1, 4 tokens], "copy": [...]}

    @property
    def copy(self) -> bool:
        """Whether some forwards copy."""
        return self.min_tokens != float("inf")

    def applies(self, tokens: int) -> bool:
        return tokens >= self.min_tokens

    def describe(self) -> str:
        if not self.copy:
            how = "the relaid views"
        elif self.min_tokens <= 1:
            how = "contiguous copies, a layer at a time"
        else:
            how = f"contiguous copies from {math.ceil(self.min_tokens)} tokens on, a layer at a time"
        return f"dense FFN forwards read {how} ({self.source})"


PROMPT_TOKENS = (1, 8)  # the two input sizes whose times give each variant's fixed and per-token cost


def _time_ms(fn, reps: int = 2) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def measure_prompt_copy(site, params, tokens: Sequence[int] = PROMPT_TOKENS) -> dict[str, list[float]]:
    """ms of one layer's dense forward on the views ("view") and with contiguous copies ("copy",
    the copy included), at each token count in ``tokens`` (after a warm-up call each).

    The views are timed at the larger count only where they were faster than the copy at one token:
    where torch's GEMM falls back to a slow path on them (bf16 on AVX2: ~130 ms per token for a
    2048 x 8192 layer) one token already shows it, and more would make this measurement slow. Two
    sizes separate each variant's fixed cost from its cost per token (``copy_threshold``)."""
    from .ffn.layout import contiguous_params

    h, m = site.handler, site.module
    dtype = h.in_weight(m).dtype
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {"view": [], "copy": []}

    def dense(x):
        h.output(m, h.hidden(m, x))

    def with_copies(x):
        with contiguous_params(params):
            dense(x)

    with torch.no_grad():
        for i, t in enumerate(tokens):
            x = torch.randn(1, t, site.d, generator=g).to(dtype)
            for name, fn in (("copy", with_copies), ("view", dense)):
                if name == "view" and i > 0 and out["view"][0] >= out["copy"][0]:
                    continue  # slower already at one token: the slow path
                fn(x)  # warm-up
                out[name].append(_time_ms(lambda: fn(x)))
    return out


def copy_threshold(ms: dict[str, list[float]], tokens: Sequence[int] = PROMPT_TOKENS) -> float:
    """The token count from which copying is faster: 0 if the copy won at the first count already
    (the views' slow path), else where the straight lines through the two counts (fixed cost + cost
    per token of each variant) cross; inf if they never do."""
    if ms["copy"][0] <= ms["view"][0]:
        return 0.0
    t0, t1 = tokens[0], tokens[-1]
    slope = {k: max(0.0, (v[-1] - v[0]) / (t1 - t0)) for k, v in ms.items()}
    gain = slope["view"] - slope["copy"]  # what a copy saves per token
    if gain <= 0:
        return float("inf")
    fixed = {k: v[0] - slope[k] * t0 for k, v in ms.items()}
    return max(float(t0), (fixed["copy"] - fixed["view"]) / gain)


def prompt_copy_for_model(sites, params, tune: bool | str = "auto", layout: str = "separate") -> PromptCopy:
    """From how many tokens a patched model's dense FFN forwards copy its relaid weights back to
    contiguous (the prompt; every step of method "dense").

    ``params``: the parameters of ``sites[0]`` that patch gave another layout. Torch's CPU GEMM was as
    fast on the views as on contiguous weights for fp32 here, but for bf16 on an AVX2 EPYC (torch
    2.13) a transposed or strided weight took 10-70x longer. Measured once per CPU model, dtype,
    shape, threads and layout (``measure_prompt_copy``, ~0.1-5 s), cached with the decode tuning,
    under the same rule as the decode setting (``tune``; tiny models are not timed); without a
    measurement fp16/bf16 on a CPU copy (a copy costs far less than the slow path where there is
    one) and fp32 reads the views."""
    if not sites or not params:
        return PromptCopy(float("inf"), "not relaid")
    w = sites[0].handler.in_weight(sites[0].module)
    if w.device.type != "cpu":
        return PromptCopy(float("inf"), "default")
    d, D = int(sites[0].d), int(sites[0].D)
    key = f"prompt/{_key(w.dtype, d, torch.get_num_threads(), layout)}/D{D}"
    path = cache_file()
    doc = _load_cache(path)
    entry = _entry(doc, key)
    if entry is not None:
        return PromptCopy(float(entry["min_tokens"]), "cached", entry.get("ms"))
    busy_hit = _busy_setting(path, key)
    if busy_hit is not None:
        return busy_hit
    if tune is False or (tune == "auto" and _ffn_bytes(sites) < MIN_MEASURED_FFN_BYTES):
        # as for the decode setting, tiny (test) models are not timed: the default
        return PromptCopy(0.0 if w.dtype != torch.float32 else float("inf"), "default")
    before = cpu_sample()
    ms = measure_prompt_copy(sites[0], params)
    busy = other_load(before, cpu_sample())
    min_tokens = copy_threshold(ms)
    if busy is not None and busy > BUSY_CORES:  # used in this process, not kept (as the decode setting)
        return _used_not_cached(path, key, PromptCopy(min_tokens, "", ms))
    _remember(path, doc, key, {
        "min_tokens": min_tokens, "ms": {k: [round(x, 3) for x in v] for k, v in ms.items()},
        "tokens": list(PROMPT_TOKENS),
    })
    return PromptCopy(min_tokens, "measured", ms)
