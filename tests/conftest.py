"""Shared pytest fixtures (generic: other suites use them too). Never imports triton.

- ``rng``: a torch.Generator seeded per test (from the test's node id), so every test is
  reproducible on its own and independent of the order tests run in.
- ``isa``: parametrised over the C++ ISA paths this machine supports; forces that path for the
  test and restores the previous one. Skips, with the reason, when the extension is missing.
- ``assert_close_derived``: the tolerance rule of the project (see ``derived_tolerance``).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from glass_kernels import _ext


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


def derived_tolerance(err_torch: float, scale: float, eps_rel: float = 1e-6) -> float:
    """The project's tolerance rule, written once.

    ``err_torch`` is the max abs error of plain torch in the same dtype against an fp64 oracle;
    the path under test may err by about twice that, plus a tiny epsilon relative to the scale of
    the result (so exact-zero torch errors on trivial inputs do not demand bitwise equality).
    """
    return 2.0 * err_torch + eps_rel * max(scale, 1e-30)


def assert_close_derived(actual: torch.Tensor, oracle: torch.Tensor, torch_same_dtype: torch.Tensor,
                         what: str = "result") -> None:
    """assert max|actual - oracle| <= 2 * max|torch_same_dtype - oracle| + eps (oracle in fp64)."""
    oracle = oracle.double()
    err_torch = (torch_same_dtype.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    err = (actual.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    tol = derived_tolerance(err_torch, scale)
    assert err <= tol, f"{what}: max abs error {err:.3e} > tolerance {tol:.3e} (torch's own error {err_torch:.3e})"


@pytest.fixture(name="assert_close_derived")
def _assert_close_derived_fixture():
    return assert_close_derived
