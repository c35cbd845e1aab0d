"""GLASS for Hugging Face models: ``patch(model)``, ``unpatch(model)``, ``session(model)``.

See ``api.patch`` for usage and memory, ``schedule`` for the prompt/decode schedule, ``registry``
and ``families`` for the supported FFN classes.
"""

from .api import is_patched, patch, session, unpatch
from .config import DEFAULT_LAMBDA, METHODS, GlassConfig
from .modules import GlassFFN
from .registry import (
    FFNHandler,
    FFNSite,
    UnsupportedModelError,
    find_ffn_sites,
    register_handler,
    supported_classes,
)
from .schedule import Session
from . import families as _families  # noqa: F401  (registers the built-in handlers)

__all__ = [
    "DEFAULT_LAMBDA",
    "FFNHandler",
    "FFNSite",
    "GlassConfig",
    "GlassFFN",
    "METHODS",
    "Session",
    "UnsupportedModelError",
    "find_ffn_sites",
    "is_patched",
    "patch",
    "register_handler",
    "session",
    "supported_classes",
    "unpatch",
]
