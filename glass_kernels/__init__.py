"""glass_kernels: sparse-FFN decoding kernels for GLASS (arXiv 2508.14302).

Public API::

    import glass_kernels
    glass_kernels.ops.sparse_ffn / sparse_mlp / neuron_stats / select_neurons
    glass_kernels.quant.quantize / dequantize / sparse_ffn_q / sparse_mlp_q   (int8 / 4-bit rows)
    with glass_kernels.backend("torch" | "cpp" | "triton" | "auto"): ...
    glass_kernels.patch(model, GlassConfig(...)), unpatch, session, GlobalStats, calibrate, load_model
    glass_kernels.fit_selection(model, tokenizer, stats)   (adaptive λ and per-layer keep)

``import glass_kernels`` needs only torch: the C++ extension and triton are loaded on first use,
and the names backed by transformers-facing modules (patch, calibrate, ...) are imported lazily.
"""

from __future__ import annotations

import importlib
import sys

from . import backend, ops, quant

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY = {
    "patch": "glass_kernels.patch",
    "unpatch": "glass_kernels.patch",
    "GlassConfig": "glass_kernels.patch",
    "session": "glass_kernels.patch",
    "GlobalStats": "glass_kernels.stats",
    "calibrate": "glass_kernels.calibrate",
    "fit_selection": "glass_kernels.adaptive",
    "load_model": "glass_kernels.models",
}

__all__ = ["ops", "quant", "backend", "__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'glass_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if name == "patch":
        # the callable package itself (glass_kernels/patch/__init__.py), never the bare function:
        # the import system binds the package to this name whenever it is imported, so caching the
        # function here would make `import glass_kernels.patch as p` give the package or the
        # function depending on which import ran first
        value = sys.modules[module]
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
