"""benchmarks/ab_builds.py: a second build loads beside glass_kernels._C, both sides read the same
rows and give the same outputs when the builds are the same, the order swaps every round, and a
malformed case is refused by name."""
import shutil

import pytest

import bench_scripts
from glass_kernels import _C


def _mod():
    return bench_scripts.load("ab_builds.py")


def test_alternate_swaps_the_order_every_round():
    mod = _mod()
    calls = []
    values = {"old": iter([0.0, 10.0, 12.0, 8.0]), "new": iter([0.0, 20.0, 18.0, 24.0])}

    def side(name):
        def run():
            calls.append(name)
            return next(values[name])
        return run

    got = mod.alternate({"old": side("old"), "new": side("new")}, rounds=3)
    assert calls == ["old", "new", "old", "new", "new", "old", "old", "new"]  # warm-up first, unrecorded
    assert got == {"old": [10.0, 12.0, 8.0], "new": [20.0, 18.0, 24.0]}


@pytest.mark.parametrize("case", ["q8_0:64x96:0.5:1", "float32:33x40:1:3", "bfloat16:64x50:0.3:2", "q4_0:64x40:0.2:1"])
def test_a_copy_of_this_build_matches_it(tmp_path, case):
    mod = _mod()
    copy = tmp_path / "other" / _C.__file__.rsplit("/", 1)[-1]
    copy.parent.mkdir()
    shutil.copy(_C.__file__, copy)
    other = mod.load_build(copy)
    assert other is not _C and other.__file__ == str(copy)
    row = mod.run_case({"old": other, "new": _C}, mod.parse_case(case), rounds=2, total_bytes=1 << 16)
    assert row["max_abs_diff"] == 0.0
    assert row["layers"] >= 2 and len(row["old"]["runs"]) == len(row["ratio"]["runs"]) == 2
    assert row["ratio"]["min"] <= row["ratio"]["median"] <= row["ratio"]["max"]


@pytest.mark.parametrize("bad, message", [("q8_0:2048x8192:0.5", "wtype:dxD:keep:tokens"),
                                          ("int3:64x64:0.5:1", "unknown weight type"),
                                          ("q8_0:64x64:1.5:1", "keep must be"),
                                          ("q8_0:64x64:0.5:0", "tokens >= 1")])
def test_a_malformed_case_is_refused(bad, message):
    with pytest.raises(SystemExit, match=message):
        _mod().parse_case(bad)
