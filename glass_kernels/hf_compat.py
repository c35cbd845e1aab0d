"""Every detail of Hugging Face transformers that glass_kernels relies on and that moves between
versions, in one place. When a release renames one of them, the change is one line here, and
``tests/test_hf_compat.py`` fails on that release until it is made.

What the patch relies on, and since when:

* The KV cache reaches the top-level model's ``forward`` as the keyword ``cache`` (5.24 and later;
  ``past_key_values`` is still accepted there with a deprecation warning until 5.40) or
  ``past_key_values`` (up to 5.23), or positionally at the place that keyword has in the signature.
* Model outputs carry it back as ``.cache`` (5.24+) or ``.past_key_values`` (older).
* ``GenerationMixin._prefill`` runs ``generate()``'s prompt (whole, chunked with
  ``prefill_chunk_size``, or continuing a cache passed in); 5.0 and later. 4.x has no such method
  (its chunked prefill, ``_prefill_chunking``, is a separate path and a continued cache goes through
  the plain decode loop), so 4.x cannot tell a continued prompt from decoding: the floor is 5.0.
* A cache object answers ``get_seq_length()`` (legacy tuples of (key, value) are read too).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

# The lowest transformers the patch is tested with (CI runs the patch tests on it and on the newest
# release pip serves). pyproject.toml's `hf` extra declares the same floor; a test checks they agree.
MIN_TRANSFORMERS = "5.0.0"

# Names under which a model's forward receives the KV cache, newest first.
CACHE_ARG_NAMES = ("cache", "past_key_values")
# Attributes of a model output that hold the updated cache, newest first.
OUTPUT_CACHE_ATTRS = ("cache", "past_key_values")
# GenerationMixin methods that run generate()'s prompt (wrapped so their forwards count as prompt).
PREFILL_METHODS = ("_prefill",)


def transformers_version() -> str | None:
    """The installed transformers' version, or None when it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _version_tuple(v: str) -> tuple[int, int, int]:
    """(major, minor, micro) of a version string; a pre-release ("5.1.0rc1") counts as its release."""
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", v)
    if m is None:
        raise ValueError(f"not a version: {v!r}")
    return tuple(int(g or 0) for g in m.groups())


def check_transformers() -> None:
    """Raise a clear error when the installed transformers is older than MIN_TRANSFORMERS."""
    v = transformers_version()
    if v is not None and _version_tuple(v) < _version_tuple(MIN_TRANSFORMERS):
        raise RuntimeError(
            f"glass_kernels.patch needs transformers >= {MIN_TRANSFORMERS} (installed: {v}): older releases "
            "have no GenerationMixin._prefill, so a chunked or continued prompt in generate() would be "
            f"decoded as if it were generated text. `pip install -U 'transformers>={MIN_TRANSFORMERS}'`"
        )


def cache_arg_name(forward: Callable) -> str | None:
    """The name under which ``forward`` declares its KV cache argument (None if it declares none)."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in CACHE_ARG_NAMES if n in params), None)


def is_cache(obj: Any) -> bool:
    """A transformers Cache (or anything that answers ``get_seq_length``)."""
    return obj is not None and callable(getattr(obj, "get_seq_length", None))


def find_cache(args: tuple, kwargs: dict, position: int | None) -> tuple[bool, Any]:
    """(found, cache) from a forward call's arguments: by any known keyword, else at ``position``.

    ``found`` is False when the call names no cache argument at all (then the model either runs
    without a cache or received it in a way this module does not know: see ``stray_cache``).
    """
    for name in CACHE_ARG_NAMES:
        if name in kwargs:
            return True, kwargs[name]
    if position is not None and position < len(args):
        return True, args[position]
    return False, None


def stray_cache(kwargs: dict) -> str | None:
    """The keyword of a Cache object passed under a name not in CACHE_ARG_NAMES (a future rename)."""
    for name, value in kwargs.items():
        if name not in CACHE_ARG_NAMES and is_cache(value):
            return name
    return None


def cache_length(cache: Any) -> int:
    """Tokens already in ``cache`` (0 for None or an empty cache)."""
    if cache is None:
        return 0
    if is_cache(cache):
        # A Python int for DynamicCache / StaticCache: no device sync.
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):  # legacy tuple-of-(key, value) cache
        if len(cache) == 0 or cache[0] is None or len(cache[0]) == 0:
            return 0
        return int(cache[0][0].shape[-2])
    raise TypeError(f"unsupported KV cache type {type(cache).__name__}")


def output_cache(outputs: Any) -> Any:
    """The updated KV cache of a model output (None if it carries none)."""
    for attr in OUTPUT_CACHE_ATTRS:
        # Read the dataclass fields directly: the old name is a deprecated alias on new versions.
        fields = getattr(outputs, "__dataclass_fields__", None)
        if fields is not None and attr not in fields:
            continue
        value = getattr(outputs, attr, None)
        if value is not None:
            return value
    return None


def cache_kwargs(model: Any, cache: Any) -> dict:
    """``{name: cache}`` to pass ``cache`` to ``model(...)`` under the name its forward declares."""
    name = cache_arg_name(model.forward) or CACHE_ARG_NAMES[-1]
    return {name: cache}


def prefill_methods(model: Any) -> list[str]:
    """The PREFILL_METHODS this model's class really has (empty means: transformers moved it)."""
    return [m for m in PREFILL_METHODS if callable(getattr(type(model), m, None))]
