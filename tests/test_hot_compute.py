"""benchmarks/hot_compute.py: every requested ISA path is timed on the same rows, alternating, and
the ratio line compares each to the first; the core's ISA is what the script leaves set."""
from pathlib import Path

import bench_scripts
from glass_kernels import _ext


def test_several_paths_alternate_and_are_compared(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(bench_scripts.__file__).resolve().parents[1] / "benchmarks"))
    mod = bench_scripts.load("hot_compute.py")
    C = _ext.require()
    isas = _ext.supported_isas()[-2:]  # scalar alone where nothing else runs
    before = C.get_isa()
    switched = []
    real = mod._C.set_isa
    monkeypatch.setattr(mod._C, "set_isa", lambda name: switched.append(name) or real(name))
    try:
        mod.main(["--formats", "bfloat16", "q8_0", "--d", "64", "--threads", "1", "--cache-kib", "8",
                  "--rounds", "3", "--seconds", "0.03", "--isa", *isas])
    finally:
        real(before)
    out = capsys.readouterr().out
    for fmt in ("bfloat16", "q8_0"):
        for isa in isas:
            assert f"{fmt:9s} 1 thread(s), {isa}, D = " in out
    assert out.count(" / " + isas[0] + ", per round: ") == 2 * (len(isas) - 1)
    # warm-up once per path, then each round visits every path in turn
    assert switched == (isas + isas * 3) * 2
