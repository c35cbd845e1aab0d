"""Builds glass_kernels._C through CMake + Ninja (see CMakeLists.txt); the rest is pyproject.toml."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11  # a build requirement (pyproject.toml), importable in the isolated env

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("GLASS_BUILD_TYPE", "Release")
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DGLASS_PYTHON_OUTPUT_DIR={out_dir}",
            "-DGLASS_BUILD_PYTHON=ON",
            "-DGLASS_BUILD_TESTS=OFF",  # the C++ tests are built by tests/test_cpp.py
        ]
        args += [a for a in os.environ.get("GLASS_CMAKE_ARGS", "").split() if a]
        subprocess.check_call(args)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])


setup(ext_modules=[CMakeExtension("glass_kernels._C")], cmdclass={"build_ext": CMakeBuild})
