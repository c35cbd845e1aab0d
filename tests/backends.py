"""Forcing one implementation of the ops in a test: the torch reference ("torch") or the C++ core on
one ISA path ("cpp:<isa>"). A plain module (not conftest), shared by the op tests and the fuzzing."""

from __future__ import annotations

import contextlib

import glass_kernels
from glass_kernels import _ext


def names() -> list[str]:
    """"torch" and "cpp:<isa>" for every ISA path this machine runs."""
    return ["torch"] + [f"cpp:{i}" for i in _ext.supported_isas()]


# The extension paths run, per dtype, an extension kernel or the plain path's (glass.h): the kernel
# names each may report.
_EXTENSION_KERNELS = {
    "avx512_ext": {"bfloat16": ("avx512_bf16",), "float16": ("avx512",), "float32": ("avx512",)},
    "neon_ext": {"bfloat16": ("neon_bf16", "neon"), "float16": ("neon_fhm", "neon"), "float32": ("neon",)},
}


def kernel_isas(isa: str, dtype: str) -> tuple[str, ...]:
    """The suffixes ("..._sparse_ffn__<suffix>") that float rows of ``dtype`` ("float32" | "float16" |
    "bfloat16", or a quantized row type: the plain path) may report on ISA path ``isa``."""
    return _EXTENSION_KERNELS.get(isa, {}).get(dtype, (isa.removesuffix("_ext"),))


@contextlib.contextmanager
def forced(name: str):
    with contextlib.ExitStack() as stack:
        if name == "torch":
            stack.enter_context(glass_kernels.backend("torch"))
        else:
            stack.enter_context(glass_kernels.backend("cpp"))
            stack.enter_context(_ext.isa(name.split(":", 1)[1]))
        yield name
