"""What the machine is, for the headers of reports and benchmark output (one place for it)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux); the platform's guess elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the source tree glass_kernels runs from ("+dirty" with uncommitted changes to
    tracked files), or "unknown" for an installed copy outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"], capture_output=True,
                               timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def software_versions() -> dict[str, str]:
    """What a measured figure depends on besides the machine: recorded in every report, benchmark
    JSON and statistics file, so that a number can be traced to the code and packages that made it."""
    import torch

    return {
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "triton": _package_version("triton"),
        "glass_kernels": _package_version("glass_kernels"),
        "glass_kernels_commit": git_commit(),
    }


def describe_machine() -> dict:
    """Everything a report records about where it ran: CPU, cores, platform, torch threads, the C++
    core's ISA path, and software_versions(). One definition for the CLI, the evaluation and the
    benchmarks."""
    import torch

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    info.update(software_versions())
    try:
        from . import _ext

        info["glass_ext"] = bool(_ext.available())
        if _ext.available():
            info["glass_isa"] = _ext.get_isa()
            info["glass_isas"] = ",".join(_ext.supported_isas())
    except Exception as e:  # report, never fail a run for machine info
        info["glass_ext"] = f"unavailable ({type(e).__name__})"
    return info
