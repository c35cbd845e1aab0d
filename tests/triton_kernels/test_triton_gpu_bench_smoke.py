"""The GPU benchmark scripts run: without CUDA they skip cleanly, and --smoke executes them on CPU
under the Triton interpreter on a tiny shape (their timings mean nothing there).

They run in this process (the interpreter is already on, and a subprocess would pay the torch and
transformers imports again); on a CUDA machine run the benchmarks themselves instead.
"""

import importlib
import json
from pathlib import Path

import pytest
import torch

GPU = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA present: run benchmarks/gpu/*.py themselves")


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(GPU))  # the scripts import their sibling gpu_common
    return lambda name: importlib.import_module(name)


def test_bench_scripts_skip_without_cuda(scripts, capsys):
    for name in ("bench_sparse_ffn", "bench_e2e_llama"):
        assert scripts(name).main([]) == 0
        assert "SKIP: no CUDA device" in capsys.readouterr().out, name


def test_bench_sparse_ffn_smoke(scripts, tmp_path):
    out = tmp_path / "smoke.json"
    rc = scripts("bench_sparse_ffn").main(["--smoke", "--dtypes", "bf16", "--keeps", "1.0,0.3",
                                           "--reps", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(row["correct"] for row in rows)
    # keeps 1.0 and 0.3: one float row each, and one per quantized format (Q8_0, Q4_0)
    assert len([r for r in rows if "wtype" not in r]) == 2
    assert sorted(r["wtype"] for r in rows if "wtype" in r) == ["q4_0", "q4_0", "q8_0", "q8_0"]


def test_bench_e2e_llama_smoke(scripts, tmp_path, capsys):
    # the patched model needs the ops layer (issue 2) for its "triton" backend
    pytest.importorskip("glass_kernels.ops", reason="glass_kernels.ops (issue 2) not present yet")
    pytest.importorskip("transformers")
    out = tmp_path / "e2e.json"
    rc = scripts("bench_e2e_llama").main(["--smoke", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["model"]) for r in results] == [("eager", "dense"), ("eager", "glass")]
    assert not any("error" in r for r in results), results
