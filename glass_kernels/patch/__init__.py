"""GLASS for Hugging Face models: ``patch(model)``, ``unpatch(model)``, ``session(model)``.

See ``api.patch`` for usage and memory, ``schedule`` for the prompt/decode schedule, ``registry``
and ``families`` for the supported FFN classes.
"""

import sys as _sys
import types as _types

from .api import is_patched, patch, session, unpatch
from .config import DEFAULT_LAMBDA, METHODS, GlassConfig
from .modules import GlassFFN
from ..ffn import (  # the FFN registry lives in glass_kernels.ffn; re-exported for patch's users
    FFNHandler,
    FFNSite,
    UnsupportedModelError,
    find_ffn_sites,
    register_handler,
    supported_classes,
)
from .schedule import Session

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


# ``glass_kernels.patch`` names both this package and the function: importing the package (as
# ``glass_kernels.stats`` does) binds the package to ``glass_kernels.patch``, which would shadow
# the function. Calling the package calls the function, so ``glass_kernels.patch(model, ...)``
# works whichever got bound (the same device as ``glass_kernels.backend``).
class _CallablePackage(_types.ModuleType):
    def __call__(self, model, config=None, stats=None, **kwargs):
        return patch(model, config, stats, **kwargs)

    __call__.__doc__ = patch.__doc__  # help(glass_kernels.patch) shows the function's documentation


_sys.modules[__name__].__class__ = _CallablePackage
