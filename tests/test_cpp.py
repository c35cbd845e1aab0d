"""Builds the torch-free C++ core and its unit tests (GLASS_BUILD_PYTHON=OFF) in a temporary
directory and runs them through ctest: the scalar path and every vector path this CPU supports,
against a double-precision oracle (csrc/tests/test_main.cpp)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: cannot build the C++ tests (pip install {name})")
    return path


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory):
    cmake = _tool("cmake")
    _tool("ninja")
    build = tmp_path_factory.mktemp("glass_cpp")
    subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DGLASS_BUILD_PYTHON=OFF", "-DGLASS_BUILD_TESTS=ON", "-DGLASS_BUILD_SHARED=ON"],
        check=True, capture_output=True, text=True)
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    res = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return build


def test_ctest(cpp_build):
    ctest = shutil.which("ctest") or _tool("ctest")
    res = subprocess.run([ctest, "--output-on-failure"], cwd=cpp_build, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_forced_scalar_path(cpp_build):
    # GLASS_ISA=scalar at load time forces the generic path (what users do to rule out a kernel).
    env = dict(os.environ, GLASS_ISA="scalar")
    exe = cpp_build / "glass_tests"
    res = subprocess.run([str(exe), "--isa-report"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(current scalar)" in res.stdout, res.stdout
