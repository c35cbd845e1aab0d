"""Forcing one implementation of the ops in a test: the torch reference ("torch") or the C++ core on
one ISA path ("cpp:<isa>"). A plain module (not conftest), shared by the op tests and the fuzzing."""

from __future__ import annotations

import contextlib

import glass_kernels
from glass_kernels import _ext


def names() -> list[str]:
    """"torch" and "cpp:<isa>" for every ISA path this machine runs."""
    return ["torch"] + [f"cpp:{i}" for i in _ext.supported_isas()]


@contextlib.contextmanager
def forced(name: str):
    with contextlib.ExitStack() as stack:
        if name == "torch":
            stack.enter_context(glass_kernels.backend("torch"))
        else:
            stack.enter_context(glass_kernels.backend("cpp"))
            stack.enter_context(_ext.isa(name.split(":", 1)[1]))
        yield name
