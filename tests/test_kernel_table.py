"""benchmarks/kernel_table.py: the README's kernel table from a pytest-benchmark JSON."""
import importlib.util
from pathlib import Path


def _kernel_table():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_table.py"
    spec = importlib.util.spec_from_file_location("kernel_table_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(median, **extra):
    return {"name": extra.get("impl", "x"), "stats": {"median": median}, "extra_info": extra}


def _case(impl, gbps, keep=0.2, **kw):
    return _bench(0.001, impl=impl, d=576, D=1536, dtype="float32", threads=2, keep=keep, gbps=gbps, **kw)


def test_cases_are_given_against_stream_and_against_a_read_of_their_own_size():
    data = {"benchmarks": [
        _bench(0.03, impl="stream_sum", threads=2, gbps=30.0),
        _case("dense", 24.0, keep=1.0),
        _case("compact", 18.0),
        _case("bundled", 21.0, neurons_in_flight=8, prefetch_neurons=0, speedup_vs_compact=1.17),
        _case("stream_call", 24.0),
    ]}
    md = _kernel_table().tables(data)
    row = next(line for line in md.splitlines() if "| bundled |" in line)
    assert "| 70% | 88% |" in row  # 21 of STREAM's 30 GB/s; 21 of the same-size read's 24
    assert "| stream_call |" not in md  # it is a column, not a row of the other table
    assert "% of same-size read" in md
    header = next(line for line in md.splitlines() if line.startswith("| d x D"))
    assert all(line.count("|") == header.count("|") for line in md.splitlines() if line.startswith("| 576x1536"))


def test_runs_without_the_same_size_read_keep_the_old_table():
    data = {"benchmarks": [_bench(0.03, impl="stream_sum", threads=2, gbps=30.0), _case("compact", 18.0)]}
    md = _kernel_table().tables(data)
    assert "same-size" not in md
    header = next(line for line in md.splitlines() if line.startswith("| d x D"))
    row = next(line for line in md.splitlines() if "| compact |" in line)
    assert header.count("|") == row.count("|")
