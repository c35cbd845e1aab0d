"""Shared pytest fixtures (generic: other suites use them too). Never imports triton.

- ``rng``: a torch.Generator seeded per test (from the test's node id), so every test is
  reproducible on its own and independent of the order tests run in.
- ``isa``: parametrised over the C++ ISA paths this machine supports; forces that path for the
  test and restores the previous one. Skips, with the reason, when the extension is missing.
- ``assert_close_derived``: the tolerance rule of the project (see ``derived_tolerance``).
- every test runs with a cache root of its own (autouse ``_private_cache``): what patch measures
  and caches (decode tuning, prompt copies) never reaches the user's cache, nor leaks from one test
  into another; the model and statistics caches are linked from the real root.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from glass_kernels import _ext
from glass_kernels.models import cache_dir
from tolerances import assert_close_derived, derived_tolerance  # noqa: F401 (re-exported)


_REAL_CACHE = cache_dir()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("glass_cache")
    for sub in ("models", "stats"):
        (_REAL_CACHE / sub).mkdir(parents=True, exist_ok=True)
        (root / sub).symlink_to(_REAL_CACHE / sub, target_is_directory=True)
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(root))
    return root


def _seed_for(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode())  # stable across runs and Python hash seeds


@pytest.fixture
def rng(request) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed_for(request.node.nodeid))
    return g


def _isa_params():
    isas = _ext.supported_isas()
    if not isas:
        reason = f"C++ extension glass_kernels._C not available ({_ext.load_error()})"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-ext")]
    return isas


@pytest.fixture(params=_isa_params())
def isa(request):
    """Name of the ISA path in force for this test (the C++ core is switched to it)."""
    with _ext.isa(request.param):
        yield request.param



@pytest.fixture(name="assert_close_derived")
def _assert_close_derived_fixture():
    return assert_close_derived
