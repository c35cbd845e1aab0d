"""Lazy loader of the pybind11 module ``glass_kernels._C`` and its ISA / thread helpers.

``import glass_kernels`` never imports ``_C``; the first op that needs the C++ core does, once.
A missing or broken extension is remembered (and logged once) and the ops fall back to the
pure-torch reference under backend "auto".
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

_C = None  # the module once loaded
_load_error: str | None = None
_tried = False


def load():
    """The ``_C`` module, or None when it cannot be imported (the reason is in ``load_error()``)."""
    global _C, _load_error, _tried
    if _tried:
        return _C
    _tried = True
    try:
        _C = importlib.import_module("glass_kernels._C")
    except Exception as e:  # ImportError, or an OSError / undefined symbol from a stale build
        _C = None
        _load_error = f"{type(e).__name__}: {e}"
        logger.info("glass_kernels._C not available (%s); the torch reference is used", _load_error)
        return _C
    _choose_threading(_C)
    return _C


def _openmp_runtimes() -> set[str] | None:
    """The OpenMP runtime files mapped into this process (Linux), or None where that cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        return None
    return {p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))}


def _choose_threading(C) -> None:
    """Run the core's threads on torch's OpenMP team when the core shares torch's OpenMP runtime.

    Why: torch's intra-op threads are OpenMP threads that keep spinning for a while after each op;
    the core's own pool then has to win a core from them at every FFN call. Measured on a 2-core Xeon
    (SmolLM2, keep 0.5): 480 us per sparse FFN call with the pool, 220 us on torch's team, decode
    0.97x -> 1.19x of dense. Kept as it is when GLASS_THREADING is set (the core read it), when torch
    does not use OpenMP, or when more than one OpenMP runtime is loaded (then the core's team would
    be a second one, with the pool's problem and none of its robustness to a loaded machine)."""
    if os.environ.get("GLASS_THREADING") or "OpenMP" not in torch.__config__.parallel_info():
        return
    if not shares_torch_runtime(_openmp_runtimes(), os.path.dirname(torch.__file__)):
        return
    try:
        C.set_threading("openmp")
    except (RuntimeError, ValueError):  # a core built without OpenMP keeps its pool
        pass


# A wheel's private copy of a runtime, renamed by auditwheel with a hash (soname included), e.g.
# sentencepiece.libs/libgomp-6a29c32d.so.1.0.0: only its own package binds to it, never the core.
_VENDORED = re.compile(r"^lib(gomp|iomp5|omp)-[0-9a-f]{6,}\.so")


def shares_torch_runtime(runtimes: set[str] | None, torch_dir: str) -> bool:
    """Whether torch's OpenMP runtime is the one the core binds to: exactly one runtime under its
    plain soname is loaded, and torch does not carry a private (renamed) copy of its own. Private
    copies of other packages (vLLM's environment loads sentencepiece's) do not matter."""
    if runtimes is None:
        return False
    plain = [p for p in runtimes if not _VENDORED.match(os.path.basename(p))]
    torch_private = [p for p in runtimes if _VENDORED.match(os.path.basename(p))
                     and os.path.abspath(p).startswith(os.path.abspath(torch_dir) + os.sep)]
    return len(plain) == 1 and not torch_private


def threading() -> str | None:
    """Where the core's threads come from: "pool" | "openmp" (None without ``_C``)."""
    C = load()
    return C.get_threading() if C is not None else None


def available() -> bool:
    """Whether the C++ core can be used."""
    return load() is not None


def load_error() -> str | None:
    """Why ``_C`` could not be loaded (None when it loaded or was not tried)."""
    load()
    return _load_error


def require():
    """The ``_C`` module, or RuntimeError saying how to build it."""
    C = load()
    if C is None:
        raise RuntimeError(
            "backend 'cpp' requested but the C++ extension glass_kernels._C is not available "
            f"({_load_error}); build it with `pip install -e . --no-build-isolation`"
        )
    return C


_build_id: str | None = None


def build_id() -> str | None:
    """A digest of the loaded ``_C`` file (None without it): measurements of its kernels (the tuning
    cache) are only reused by the same build, so a rebuilt or upgraded core is measured afresh."""
    global _build_id
    C = load()
    if C is None:
        return None
    if _build_id is None:
        import hashlib

        with open(C.__file__, "rb") as f:
            _build_id = hashlib.sha256(f.read()).hexdigest()[:16]
    return _build_id


def supported_isas() -> list[str]:
    """ISA paths both compiled into ``_C`` and supported by this CPU (e.g. ['scalar', 'avx2']); [] without _C."""
    C = load()
    return list(C.supported_isas()) if C is not None else []


def get_isa() -> str | None:
    """The ISA path ``_C`` currently uses, or None without _C."""
    C = load()
    return C.get_isa() if C is not None else None


def set_isa(name: str) -> None:
    """Force an ISA path ("auto" | "scalar" | "avx2" | "avx512" | "avx512_ext" | "neon" | "neon_ext"); errors name the argument."""
    C = require()
    if not isinstance(name, str):
        raise TypeError(f"isa must be a str, got {type(name).__name__}")
    if name != "auto" and name not in C.supported_isas():
        raise ValueError(f"isa {name!r} is not supported here; supported: {list(C.supported_isas())} or 'auto'")
    C.set_isa(name)


@contextlib.contextmanager
def isa(name: str) -> Iterator[None]:
    """Context manager forcing the C++ core onto one ISA path, restoring the previous one on exit."""
    C = require()
    previous = C.get_isa()
    set_isa(name)
    try:
        yield
    finally:
        C.set_isa(previous)


def sync_threads(C) -> None:
    """Make the C++ core use torch.get_num_threads() threads.

    Compares with the core's own count (not a cached value, so a direct ``_C.set_num_threads``
    elsewhere cannot leave it stale): two C calls, ~0.2 us, when nothing changed.
    """
    n = torch.get_num_threads()
    if n != C.get_num_threads():
        C.set_num_threads(n)


def get_num_threads() -> int | None:
    """Thread count of the C++ core, or None without _C."""
    C = load()
    return C.get_num_threads() if C is not None else None
