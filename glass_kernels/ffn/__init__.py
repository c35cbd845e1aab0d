"""The FFNs of Hugging Face models, for everything that reads them: finding a model's FFN modules
(the handler registry, one small handler per family), the neuron-major weight layout, and the one
per-neuron statistic that calibration, the patch's prompt phase and the evaluation all accumulate.

Adding a model family, or changing how the statistic masks or normalises, is one change here. This
package depends on nothing else of glass_kernels but ``ops`` (for the statistic's kernel); ``patch``,
``stats``, ``calibrate`` and ``evaluation`` build on it.
"""

from .registry import (
    FFNHandler,
    FFNSite,
    UnsupportedModelError,
    find_ffn_sites,
    is_patched,
    register_handler,
    restore_row_major,
    supported_classes,
)
from .statistic import accumulate_statistic, down_norms
from . import families as _families  # noqa: F401  (registers the built-in handlers)

__all__ = [
    "FFNHandler",
    "FFNSite",
    "UnsupportedModelError",
    "accumulate_statistic",
    "down_norms",
    "find_ffn_sites",
    "is_patched",
    "register_handler",
    "restore_row_major",
    "supported_classes",
]
