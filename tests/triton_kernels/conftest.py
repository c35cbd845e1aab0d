# The interpreter must be on before triton (and the @triton.jit kernels) are first imported: CI has
# no GPU, so the Triton kernels run on CPU tensors through Triton's numpy interpreter. On a machine
# with CUDA the same tests run compiled on CUDA tensors (the interpreter is left as the user set it).
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _triton_problem():
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        return f"triton is not importable: {e}"
    mod = sys.modules.get("glass_kernels.triton.sparse_ffn")
    if (mod is not None and not torch.cuda.is_available()
            and type(mod._sparse_ffn_kernel).__name__ != "InterpretedFunction"):
        return ("glass_kernels.triton was imported before tests/triton_kernels/conftest.py set "
                "TRITON_INTERPRET=1 (set it in the environment or run tests/triton_kernels on its own)")
    return None


_PROBLEM = _triton_problem()
_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if _PROBLEM is None:
        return
    skip = pytest.mark.skip(reason=_PROBLEM)
    for item in items:
        if str(item.fspath).startswith(_HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    """CUDA when present and not interpreting (GPU sessions), else CPU under the interpreter."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return torch.device("cuda")
    return torch.device("cpu")
