"""Shared pytest-benchmark setup for the benchmark suites (kernels, end to end).

Generic helpers only: machine description, thread control, a session-wide table of measured
times (so a later case can report its ratio to an earlier baseline of the same run), and the
quick-subset switch (GLASS_BENCH_QUICK=1, or `-m quick`).
"""
from __future__ import annotations

import os
import platform
import resource
import time

import pytest
import torch

from glass_kernels.machine import cpu_name, software_versions


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the small subset run by GLASS_BENCH_QUICK=1")


def quick_mode() -> bool:
    """GLASS_BENCH_QUICK=1 selects a small subset (about a minute) instead of the full matrix."""
    return os.environ.get("GLASS_BENCH_QUICK", "0") not in ("", "0", "false", "no")


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall, busy CPU seconds of the whole machine incl. steal, CPU seconds of this process)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None  # not Linux: no figure rather than a wrong one
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = resource.getrusage(resource.RUSAGE_SELF)
    tick = os.sysconf("SC_CLK_TCK")
    return (time.monotonic(), (user + nice + system + irq + softirq + steal) / tick, own.ru_utime + own.ru_stime)


_last_cpu_sample = _cpu_seconds()


def other_load() -> float | None:
    """Cores' worth of CPU used by anything but this process since the previous call.

    The load average cannot tell: it counts the benchmark's own threads, so a 2-thread run on 2 cores
    always looks "full". Machine-wide busy time minus our own CPU time is what competed with us.
    """
    global _last_cpu_sample
    now = _cpu_seconds()
    prev, _last_cpu_sample = _last_cpu_sample, now
    if now is None or prev is None or now[0] - prev[0] < 0.05:
        return None
    wall = now[0] - prev[0]
    return max(0.0, ((now[1] - prev[1]) - (now[2] - prev[2])) / wall)


def machine_info() -> dict:
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        **software_versions(),
    }
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    load = other_load()
    if load is not None:
        info["other_load_cores"] = round(load, 3)
    try:
        import glass_kernels._C as _C  # the C++ core, if built

        info["isa"] = _C.get_isa()
        info["isas"] = ",".join(_C.supported_isas())
    except ImportError:
        info["isa"] = "none (extension not built)"
    return info


def set_threads(n: int) -> None:
    """Same thread count for torch and for the C++ core."""
    torch.set_num_threads(n)
    try:
        import glass_kernels._C as _C

        _C.set_num_threads(n)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def results() -> dict:
    """Session-wide {key: median seconds}, filled by baselines, read by the cases after them."""
    return {}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    set_threads(n)


def median_s(benchmark) -> float:
    return float(benchmark.stats.stats.median)
