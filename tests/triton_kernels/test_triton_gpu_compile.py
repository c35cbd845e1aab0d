"""The Triton kernels compile for sm_90 (H100/H200) without a GPU, spill-free, and the float64
aggregation of select_neurons is not contracted into FMAs (benchmarks/gpu/check_compile.py).

The interpreter tests check semantics; this checks what only the real compiler sees. It runs in
a subprocess because this process has TRITON_INTERPRET=1 (its kernels are interpreter wrappers).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "check_compile.py"


def test_kernels_compile_for_sm90_without_spills_or_fma():
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip(f"triton's NVIDIA toolchain (ptxas, cuobjdump) is not bundled in {bin_dir}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--strict", "--arch", "90"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, f"check_compile failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "contracted into an FMA (fusion on): kernel False, naive control True" in r.stdout, r.stdout[-2000:]
