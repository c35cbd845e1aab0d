"""Setup shared by the GPU benchmarks: device facts, timing with a flushed L2, the baselines.

The baselines are the same computations the tests use as "torch's own" result
(tests/triton_kernels/oracles.py::ffn): the HF LlamaMLP forward with F.linear (cuBLAS) on the full
weights, and on a compacted copy of the selected rows (GRIFFIN-style).
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def device_facts(device: torch.device) -> dict:
    facts = {"torch": torch.__version__, "python": platform.python_version(), "device_type": device.type}
    try:
        import triton
        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        facts.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        facts.update(name=platform.processor() or platform.machine())
    return facts


def time_ms(fn, device: torch.device, reps: int = 100, graph: bool = False) -> dict:
    """Median and 20/80% quantiles of ``fn`` in ms, L2 flushed before every timed repetition.

    CUDA: triton.testing.do_bench (a 256 MB buffer is zeroed before each rep, outside the events).
    ``graph=True`` captures fn in a CUDA graph first and times its replay (no launch overhead).
    The caller runs fn once before (autotuning / compilation never lands in the timed region).
    CPU (smoke mode): wall clock of a few reps, only to prove the script runs.
    """
    if device.type != "cuda":
        ts = []
        for _ in range(max(1, min(reps, 3))):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return {"median": statistics.median(ts), "q20": min(ts), "q80": max(ts)}
    from triton.testing import do_bench
    run = fn
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    q20, med, q80 = do_bench(run, warmup=25, rep=max(25, reps), quantiles=[0.2, 0.5, 0.8])
    return {"median": med, "q20": q20, "q80": q80}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth: read + write bytes of a large device-to-device copy per second."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, reps=50)["median"]
    return 2 * n * 4 / (t * 1e-3) / 1e9


def llama_mlp(x, w_gate, w_up, w_down):
    """HF LlamaMLP.forward: down(silu(gate(x)) * up(x)); w_down is [d, D] (nn.Linear layout)."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
