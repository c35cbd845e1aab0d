"""benchmarks/conftest.py's other_load(): CPU used by other processes, not by the benchmark itself."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench_scripts

if not Path("/proc/stat").exists():
    pytest.skip("other_load reads /proc/stat (Linux)", allow_module_level=True)


def _bench_conftest():
    return bench_scripts.load("conftest.py")


def _spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_own_work_is_not_counted_and_a_busy_neighbour_is():
    bc = _bench_conftest()
    bc.other_load()
    _spin(0.6)  # this process busy: not "other" load
    own = bc.other_load()
    neighbour = subprocess.Popen([sys.executable, "-c",
                                  "import time\nt=time.monotonic()+1.5\nwhile time.monotonic()<t: pass"])
    try:
        bc.other_load()
        time.sleep(0.8)  # this process idle while the neighbour spins a core
        other = bc.other_load()
    finally:
        neighbour.wait()
    assert own is not None and other is not None
    # Loose bounds: the CI machine may itself be shared, but a spinning neighbour is most of a core
    # and our own spinning must not show up as anywhere near one.
    assert other > 0.5
    assert own < other
