"""benchmarks/ab_huge_pages.py: the A/B alternates the two sides, reports each side's median and
range and the per-pair ratio, and its plain side really is plain memory with the same values."""
import torch

import bench_scripts


def _ab_module():
    return bench_scripts.load("ab_huge_pages.py")


def test_ab_alternates_and_reports_pairs():
    mod = _ab_module()
    calls = []
    plain_values = iter([1.0, 10.0, 12.0, 8.0, 11.0])  # the first call is the dropped warm-up
    huge_values = iter([1.0, 20.0, 18.0, 24.0, 22.0])

    def plain():
        calls.append("p")
        return next(plain_values)

    def huge():
        calls.append("h")
        return next(huge_values)

    row = mod.ab("case", plain, huge, rounds=4)
    assert calls == ["p", "h", "p", "h", "h", "p", "p", "h", "h", "p"]  # the order swaps every round
    assert row["plain"]["runs"] == [10.0, 12.0, 8.0, 11.0]
    assert row["huge"]["median"] == 21.0 and row["huge"]["min"] == 18.0 and row["huge"]["max"] == 24.0
    assert row["ratio_min"] == 1.5 and row["ratio_max"] == 3.0 and row["ratio_median"] == 2.0


def test_placed_copies_values_into_either_kind_of_memory():
    mod = _ab_module()
    t = torch.randn(3, 5).t()  # not contiguous
    for huge in (False, True):
        c = mod.placed(t, huge)
        assert c.is_contiguous() and torch.equal(c, t) and c.data_ptr() != t.data_ptr()


def test_thp_mode_reads_the_bracketed_word(tmp_path, monkeypatch):
    mod = _ab_module()
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    real_path = mod.Path
    monkeypatch.setattr(mod, "Path", lambda p: f if "transparent_hugepage" in str(p) else real_path(p))
    assert mod.thp_mode() == "madvise"
