"""benchmarks/kernel_table.py: each case's "% of STREAM" is taken against the STREAM-like read
measured beside that case, marked where the bandwidth moved across it; older JSON files (no local
figure) fall back to the run's STREAM test."""
import bench_scripts


def _kernel_table():
    return bench_scripts.load("kernel_table.py")


def _case(impl, gbps, median_s, **extra):
    info = {"impl": impl, "d": 2048, "D": 8192, "dtype": "float32", "threads": 2, "keep": 0.5, "gbps": gbps}
    return {"name": impl, "stats": {"median": median_s}, "extra_info": info | extra}


def _stream(how, gbps):
    return {"name": how, "stats": {"median": 0.05}, "extra_info": {"impl": how, "threads": 2, "gbps": gbps}}


def _row(table: str, impl: str) -> list[str]:
    line = next(l for l in table.splitlines() if f"| {impl} |" in l)
    return [c.strip() for c in line.strip("|").split("|")]


def test_percent_of_stream_uses_the_case_own_figure():
    kt = _kernel_table()
    data = {"benchmarks": [
        _case("bundled", 20.0, 0.004, stream_before_gbps=24.0, stream_after_gbps=26.0, stream_gbps=25.0),
        _stream("stream_sum", 40.0)]}  # the run's figure, measured at another moment
    row = _row(kt.tables(data), "bundled")
    assert row[8] == "80%"  # 20 / 25, not 20 / 40
    assert "0 case(s) marked ~" in kt.tables(data)


def test_drift_across_a_case_is_marked():
    kt = _kernel_table()
    data = {"benchmarks": [
        _case("bundled", 20.0, 0.004, stream_before_gbps=30.0, stream_after_gbps=18.0, stream_gbps=24.0)]}
    table = kt.tables(data)
    assert _row(table, "bundled")[8] == "83% ~"
    assert "1 case(s) marked ~" in table


def test_older_files_fall_back_to_the_run_stream_test():
    kt = _kernel_table()
    data = {"benchmarks": [_case("bundled", 20.0, 0.004), _stream("stream_sum", 25.0), _stream("stream_read", 16.0)]}
    table = kt.tables(data)
    assert _row(table, "bundled")[8] == "80%"  # the faster of the two stream tests
    assert "marked ~" not in table


def test_summary_takes_the_faster_layout_and_spreads_several_runs():
    kt = _kernel_table()

    def run(sep, bun, stream):
        return {"benchmarks": [
            _case("sparse", sep, 0.004, stream_gbps=stream, speedup_vs_compact=sep / 20, neurons_in_flight=8),
            _case("bundled", bun, 0.004, stream_gbps=stream, speedup_vs_compact=bun / 20, neurons_in_flight=4)]}

    one = kt.summary([run(20.0, 24.0, 30.0)])
    assert _row(one, "float32")[4:] == ["bundled (4)", "24.0", "80%", "", "1.20"]
    three = kt.summary([run(20.0, 24.0, 30.0), run(26.0, 22.0, 26.0), run(21.0, 25.0, 25.0)])
    row = _row(three, "float32")
    assert row[4] == "bundled (4), sparse (8), bundled (4)"  # each run's own faster layout
    assert row[5] == "25.0 (24.0-26.0)"  # median (min-max) over the runs
    assert row[6] == "100% (80-100%)"
    assert "3 run(s)" in three
