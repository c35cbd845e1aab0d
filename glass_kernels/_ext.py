"""Lazy loader of the pybind11 module ``glass_kernels._C`` and its ISA / thread helpers.

``import glass_kernels`` never imports ``_C``; the first op that needs the C++ core does, once.
A missing or broken extension is remembered (and logged once) and the ops fall back to the
pure-torch reference under backend "auto".
"""

from __future__ import annotations

import contextlib
import importlib
import logging
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


def supported_isas() -> list[str]:
    """ISA paths both compiled into ``_C`` and supported by this CPU (e.g. ['scalar', 'avx2']); [] without _C."""
    C = load()
    return list(C.supported_isas()) if C is not None else []


def get_isa() -> str | None:
    """The ISA path ``_C`` currently uses, or None without _C."""
    C = load()
    return C.get_isa() if C is not None else None


def set_isa(name: str) -> None:
    """Force an ISA path ("auto" | "scalar" | "avx2" | "avx512" | "neon" | "neon_ext"); errors name the argument."""
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
