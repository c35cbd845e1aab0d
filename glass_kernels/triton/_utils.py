"""Shared helpers of the Triton kernels: launch wrapping, interpreter detection, bucketing.

Kept torch- and triton-light so every kernel file imports the same policy:
- launches go through ``torch.library.wrap_triton`` when it exists, so ``torch.compile`` can trace
  a launcher registered with ``torch.library.triton_op``;
- under ``TRITON_INTERPRET=1`` (CI on CPU tensors) autotuning is skipped and one small fixed
  configuration is used, because the interpreter costs hundreds of ms per launch.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # torch >= 2.6
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch: plain launches, no torch.compile tracing
    _wrap_triton = None

# Activation codes, identical to glass_activation in csrc/include/glass/glass.h.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel):
    """Return ``kernel`` wrapped for tracing: call the result as ``launch(k)[grid](...)``."""
    return _wrap_triton(kernel) if _wrap_triton is not None else kernel


def activation_code(activation: str) -> int:
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}") from None


def bucket(n: int) -> int:
    """Power-of-two bucket of a size: stable autotune key that does not retune for every k."""
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Programs per SM a sparse_ffn launch aims for (see target_programs). Not measured yet: no GPU was
# available when this was written; benchmarks/gpu/bench_sparse_ffn.py --programs-per-sm sweeps it.
PROGRAMS_PER_SM = 4


def target_programs(device: torch.device) -> int:
    """How many programs a launch should aim for to fill the device.

    About PROGRAMS_PER_SM resident programs per SM (3-4 fit at the kernels' 90-150 registers per
    thread) to keep enough loads in flight for HBM; more programs also mean more fp32 partial
    rows for sparse_ffn. Under the interpreter every program is a slow Python loop: aim for few.
    """
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return PROGRAMS_PER_SM * _sm_count(idx)
    return 4
