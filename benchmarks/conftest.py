"""Shared pytest-benchmark setup for the benchmark suites (kernels, end to end).

Generic helpers only: machine description, thread control, a session-wide table of measured
times (so a later case can report its ratio to an earlier baseline of the same run), and the
quick-subset switch (GLASS_BENCH_QUICK=1, or `-m quick`), and the index sets a cold case cycles
through (covering_sets; the A/B scripts use them too).
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

from glass_kernels.machine import cpu_name, cpu_sample, software_versions
from glass_kernels.machine import other_load as _other_load


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the small subset run by GLASS_BENCH_QUICK=1")


def quick_mode() -> bool:
    """GLASS_BENCH_QUICK=1 selects a small subset (about a minute) instead of the full matrix."""
    return os.environ.get("GLASS_BENCH_QUICK", "0") not in ("", "0", "false", "no")


_last_cpu_sample = cpu_sample()


def other_load() -> float | None:
    """Cores' worth of CPU used by anything but this process since the previous call
    (glass_kernels.machine.other_load)."""
    global _last_cpu_sample
    now = cpu_sample()
    prev, _last_cpu_sample = _last_cpu_sample, now
    return _other_load(prev, now)


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
    from glass_kernels import _ext

    _C = _ext.load()  # the C++ core, if built (loading it also chooses its threading)
    if _C is not None:
        info["isa"] = _C.get_isa()
        info["isas"] = ",".join(_C.supported_isas())
        info["threading"] = _C.get_threading()
    else:
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


def covering_sets(D: int, keep: float) -> list[torch.Tensor]:
    """ceil(1 / keep) index sets of k = keep * D neurons that together cover all D: consecutive pieces
    of one random permutation (the last wraps around), each sorted. A case cycles through layers x
    sets, so it reads every row of every layer before any repeats: >= 1 GiB between two reads of the
    same bytes, at any keep (one set would repeat after keep x 1 GiB, which a VM's reported 480 MiB
    L3 may partly hold)."""
    k = max(1, int(keep * D))
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(D, generator=g)
    return [perm[(torch.arange(k) + j * k) % D].sort().values.to(torch.int32) for j in range(-(-D // k))]
