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
