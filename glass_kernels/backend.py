"""Which implementation the ops run: ``glass_kernels.backend("torch" | "cpp" | "triton" | "auto")``.

The choice lives in a contextvar, so it is per thread / per asyncio task and nests::

    with glass_kernels.backend("torch"):      # force the reference
        y = glass_kernels.ops.sparse_ffn(...)
    glass_kernels.backend.set("cpp")          # plain setter (returns a token for reset())

Resolution for one call (``resolve(device)``):
  "auto"   CPU tensors -> "cpp" if the extension is built, else "torch";
           CUDA tensors -> "triton" if triton imports, else "torch".
  "cpp"    CPU only; RuntimeError if the extension is missing or the tensors are not on the CPU.
  "triton" any device (CPU tensors need TRITON_INTERPRET=1 set before triton is imported);
           RuntimeError if triton cannot be imported.
  "torch"  the pure-torch reference, any device.

This module object is itself callable (``glass_kernels.backend("torch")``), because the package
attribute ``glass_kernels.backend`` is this submodule once it is imported.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import sys
import types
import torch

from . import _ext

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpp", "triton")

_current: contextvars.ContextVar[str] = contextvars.ContextVar("glass_kernels_backend", default="auto")

_triton_mod = None
_triton_error: str | None = None
_triton_tried = False


def _check(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get() -> str:
    """The requested backend name in this context ("auto" unless set)."""
    return _current.get()


def set(name: str) -> contextvars.Token:  # noqa: A001 - the documented name
    """Set the backend for the current context; returns a token for ``reset(token)``."""
    return _current.set(_check(name))


def reset(token: contextvars.Token) -> None:
    """Undo a ``set()``."""
    _current.reset(token)


class backend:  # noqa: N801 - used like a function: ``with backend("torch"):``
    """Context manager forcing ``name`` for the ops called inside it (the name is checked at once)."""

    def __init__(self, name: str):
        self.name = _check(name)
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> str:
        self._tokens.append(_current.set(self.name))
        return self.name

    def __exit__(self, *exc) -> None:
        _current.reset(self._tokens.pop())


def triton_module():
    """glass_kernels.triton, or None when triton (or the package) cannot be imported."""
    global _triton_mod, _triton_error, _triton_tried
    if not _triton_tried:
        _triton_tried = True
        try:
            _triton_mod = importlib.import_module("glass_kernels.triton")
        except Exception as e:  # triton missing, or no driver and no interpreter
            _triton_mod = None
            _triton_error = f"{type(e).__name__}: {e}"
            logger.info("glass_kernels.triton not available (%s)", _triton_error)
    return _triton_mod


def triton_available() -> bool:
    return triton_module() is not None


def resolve(device: torch.device, name: str | None = None) -> str:
    """The concrete backend ("torch" | "cpp" | "triton") for tensors on ``device``."""
    name = _current.get() if name is None else name
    if name == "auto":
        if device.type == "cpu":
            return "cpp" if _ext.available() else "torch"
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        return "torch"
    if name == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors only, got tensors on {device}")
        _ext.require()
        return "cpp"
    if name == "triton":
        if triton_module() is None:
            raise RuntimeError(
                f"backend 'triton' requested but glass_kernels.triton cannot be imported ({_triton_error}); "
                "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
            )
        return "triton"
    return "torch"


def resolve_for(t: torch.Tensor) -> str:
    """``resolve(t.device)`` with a fast path for CPU tensors under "auto" (the per-call case)."""
    name = _current.get()
    if name == "auto" and t.is_cpu:
        return "cpp" if _ext.available() else "torch"
    return resolve(t.device, name)


class _CallableModule(types.ModuleType):
    def __call__(self, name: str):
        return backend(name)


sys.modules[__name__].__class__ = _CallableModule
