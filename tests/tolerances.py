"""The project's tolerance rule for comparing a kernel with an fp64 oracle, written once.

A plain module (not conftest) so test files can import it without clashing with tests/triton_kernels/conftest.py.
"""

from __future__ import annotations

import torch


def derived_tolerance(err_torch: float, scale: float, eps_rel: float = 1e-6) -> float:
    """The project's tolerance rule, written once.

    ``err_torch`` is the max abs error of plain torch in the same dtype against an fp64 oracle;
    the path under test may err by about twice that, plus a tiny epsilon relative to the scale of
    the result (so exact-zero torch errors on trivial inputs do not demand bitwise equality).
    """
    return 2.0 * err_torch + eps_rel * max(scale, 1e-30)


def assert_close_derived(actual: torch.Tensor, oracle: torch.Tensor, torch_same_dtype: torch.Tensor,
                         what: str = "result", documented: float = 0.0) -> None:
    """assert max|actual - oracle| <= 2 * max|torch_same_dtype - oracle| + eps + documented (oracle in fp64).

    ``documented``: an error the path under test declares beyond floating-point rounding (e.g. the
    quantized kernels' fixed-point x), measured by the caller on the same input.
    """
    oracle = oracle.double()
    err_torch = (torch_same_dtype.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    err = (actual.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    tol = derived_tolerance(err_torch, scale) + documented
    assert err <= tol, f"{what}: max abs error {err:.3e} > tolerance {tol:.3e} (torch's own error {err_torch:.3e})"
