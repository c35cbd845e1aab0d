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


def cpu_sample() -> tuple[float, float, float] | None:
    """(wall seconds, busy CPU seconds of the whole machine incl. steal, CPU seconds of this process),
    or None off Linux. Two samples give other_load()."""
    import resource
    import time

    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None  # not Linux: no figure rather than a wrong one
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = resource.getrusage(resource.RUSAGE_SELF)
    tick = os.sysconf("SC_CLK_TCK")
    return (time.monotonic(), (user + nice + system + irq + softirq + steal) / tick, own.ru_utime + own.ru_stime)


def other_load(before, after) -> float | None:
    """Cores' worth of CPU used by anything but this process between two cpu_sample()s.

    The load average cannot tell: it counts our own threads, so a 2-thread run on 2 cores always
    looks "full". Machine-wide busy time minus our own CPU time is what competed with us."""
    if before is None or after is None or after[0] - before[0] < 0.05:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))
