"""A/B of two builds of the C core in one process: an older build (a git revision, built here, or a
built ``_C`` file) against this checkout's, alternating on the same cold rows every round.

Across processes this VM-class machine drifts by 1.5x within minutes, so a kernel change is judged
here: both builds are loaded into one Python process and called in turn on the same layers (>= 1 GiB
cycled per pass, each layer's rows in one huge-page-advised allocation as patch places them), the
order swapped every round. Each case prints both sides' median GB/s of the bytes the call reads
(selected rows only; quantized bytes for q8_0 / q4_0), their range, and the median and range of the
per-round ratios new / old.

    python benchmarks/ab_builds.py --old HEAD~1                      # build HEAD~1, compare with this build
    python benchmarks/ab_builds.py --old /path/to/_C.cpython-311-x86_64-linux-gnu.so
    python benchmarks/ab_builds.py --old HEAD~1 --isa avx2 --cases q8_0:2048x8192:0.5:4 --rounds 8
    python benchmarks/ab_builds.py --old HEAD~1 --in-flight 4 --prefetch 4 --cases q8_0:2048x8192:0.5:1
    python benchmarks/ab_builds.py --old HEAD~1 --in-flight 4 --prefetch 4 --old-prefetch 0   # each at its own

A case is ``wtype:dxD:keep:tokens`` (wtype float32 | bfloat16 | float16 | q8_0 | q4_0; rows bundled
[D, 3, row] as the quantized patch and the float "bundled" layout store them). A revision is built
once with CMake (Release, the same options as setup.py) into ~/.cache/glass_kernels/ab-builds/<sha>/
from ``git archive``, leaving the checkout alone. Both builds must take this script's call signature
(``sparse_ffn`` with a row stride, ``sparse_ffn_q``); an older one raises a TypeError that says so.
Nothing here is asserted: it is the command behind the README's "new / old" kernel tables.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import torch

from glass_kernels import _C as this_build, quant
from glass_kernels.ffn.layout import huge_pages_copy

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIB = 1 << 30


def _load_helpers() -> types.ModuleType:
    """The benchmarks' shared helpers (benchmarks/conftest.py), by path: under pytest the name
    ``conftest`` belongs to the tests' own."""
    spec = importlib.util.spec_from_file_location("glass_benchmarks_conftest", HERE / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_helpers = _load_helpers()
covering_sets, machine_info = _helpers.covering_sets, _helpers.machine_info
DEFAULT_CASES = ("float32:2048x8192:0.5:1", "bfloat16:2048x8192:0.5:1", "float32:576x1536:0.5:1",
                 "q8_0:2048x8192:0.5:1", "q8_0:2048x8192:0.5:4", "q4_0:2048x8192:0.5:1", "q8_0:576x1536:0.5:1")
QUANTIZED = ("q8_0", "q4_0")


# ---- the old build ---------------------------------------------------------------------------------

def build_revision(rev: str) -> Path:
    """The ``_C`` extension of git revision ``rev`` of this repository, built once and cached."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                         capture_output=True, text=True).stdout.strip()
    out = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glass_kernels" / "ab-builds" / sha
    found = _built(out)
    if found:
        return found
    import pybind11

    print(f"building {rev} ({sha[:12]}) into {out} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="glass-ab-") as tmp:
        src = Path(tmp) / "src"
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(src, filter="data")
        build = Path(tmp) / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                        f"-DGLASS_PYTHON_OUTPUT_DIR={out}", "-DGLASS_BUILD_PYTHON=ON", "-DGLASS_BUILD_TESTS=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "_C"], check=True, stdout=subprocess.DEVNULL)
    found = _built(out)
    if not found:
        raise SystemExit(f"the build of {rev} left no _C extension in {out}")
    return found


def _built(folder: Path) -> Path | None:
    """The _C extension file in ``folder``, if one was built there."""
    found = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    return found[0] if found else None


def load_build(path: Path) -> types.ModuleType:
    """Load another ``_C`` file beside glass_kernels._C (its init symbol is PyInit__C, so it is
    loaded as ``_C`` of a package named after its path)."""
    package = "glass_ab_" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
    sys.modules.setdefault(package, types.ModuleType(package))
    spec = importlib.util.spec_from_file_location(f"{package}._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- one case --------------------------------------------------------------------------------------

def parse_case(text: str) -> tuple[str, int, int, float, int]:
    try:
        wtype, shape, keep, tokens = text.split(":")
        d, D = (int(v) for v in shape.lower().split("x"))
        case = (wtype, d, D, float(keep), int(tokens))
    except ValueError:
        raise SystemExit(f"case {text!r}: expected wtype:dxD:keep:tokens, e.g. q8_0:2048x8192:0.5:1") from None
    if wtype not in ("float32", "bfloat16", "float16") + QUANTIZED:
        raise SystemExit(f"case {text!r}: unknown weight type {wtype!r}")
    if not 0 < case[3] <= 1 or case[4] < 1:
        raise SystemExit(f"case {text!r}: keep must be in (0, 1] and tokens >= 1")
    return case


def row_bytes(wtype: str, d: int) -> int:
    """Bytes of one neuron's row of ``d`` weights."""
    return quant.row_bytes(wtype, d) if wtype in QUANTIZED else d * getattr(torch, wtype).itemsize


def bundled_layers(wtype: str, d: int, D: int, total_bytes: int = GIB) -> list[tuple[torch.Tensor, ...]]:
    """>= total_bytes of layers (at least 2), each one huge-page-advised [D, 3, row] block seen as (gate, up, down^T)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(max(2, -(-total_bytes // (3 * D * row_bytes(wtype, d))))):
        mats = [torch.randn(D, d, generator=g) / d**0.5 for _ in range(3)]
        mats = [quant.quantize(m, wtype) if wtype in QUANTIZED else m.to(getattr(torch, wtype)) for m in mats]
        block = huge_pages_copy(torch.stack(mats, dim=1))
        out.append(tuple(block[:, j] for j in range(3)))
    return out


def caller(mod, wtype: str, x: torch.Tensor, y: torch.Tensor):
    """call(ops, idx) of ``mod``'s decode kernel on rows one stride apart."""
    B, T, d = x.shape
    xdtype = str(x.dtype).replace("torch.", "")
    if wtype in QUANTIZED:
        def call(ops, idx):
            ldw = ops[0].stride(0) // quant.block_bytes(wtype) * quant.BLOCK
            mod.sparse_ffn_q(wtype, xdtype, "silu", x.data_ptr(), B, T, d, ops[0].data_ptr(), ops[1].data_ptr(),
                             ops[2].data_ptr(), ldw, ops[0].shape[0], idx.data_ptr(), idx.numel(), False, y.data_ptr())
    else:
        def call(ops, idx):
            mod.sparse_ffn(xdtype, "silu", x.data_ptr(), B, T, d, ops[0].data_ptr(), ops[1].data_ptr(),
                           ops[2].data_ptr(), ops[0].shape[0], idx.data_ptr(), idx.numel(), False, y.data_ptr(),
                           ops[0].stride(0))
    return call


def alternate(passes: dict, rounds: int) -> dict:
    """{"old": [GB/s], "new": [GB/s]}: ``passes[name]()`` once each unrecorded (page faults, code,
    thread wake-up), then ``rounds`` rounds of both, the order swapped every round."""
    for name in ("old", "new"):
        passes[name]()
    got = {"old": [], "new": []}
    for r in range(rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            got[name].append(passes[name]())
    return got


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def run_case(builds: dict, case, rounds: int, total_bytes: int = GIB) -> dict:
    """Both builds on the same layers and index sets; GB/s per pass, per-round ratios, and the largest
    difference of their outputs on the last call (0 unless the change alters the numerics)."""
    wtype, d, D, keep, tokens = case
    layers = bundled_layers(wtype, d, D, total_bytes)
    sets = covering_sets(D, keep)  # a pass reads every row of every layer before any repeats
    nbytes = 3 * sets[0].numel() * row_bytes(wtype, d)  # per call; the same rows serve every token
    xdtype = torch.float32 if wtype in QUANTIZED else getattr(torch, wtype)
    x = torch.randn(1, tokens, d).to(xdtype)
    ys = {name: torch.empty_like(x) for name in builds}
    calls = {name: caller(mod, wtype, x, ys[name]) for name, mod in builds.items()}

    def one_pass(name: str) -> float:
        call, n = calls[name], 0
        t0 = time.perf_counter()
        for idx in sets:
            for ops in layers:
                call(ops, idx)
                n += 1
        return n * nbytes / (time.perf_counter() - t0) / 1e9

    got = alternate({name: (lambda n=name: one_pass(n)) for name in builds}, rounds)
    ratios = [n / o for o, n in zip(got["old"], got["new"])]
    return {"case": f"{wtype} {d}x{D} keep {keep:g}, {tokens} token{'s' if tokens > 1 else ''}",
            "layers": len(layers), "bytes_per_call": nbytes,
            "max_abs_diff": float((ys["old"].float() - ys["new"].float()).abs().max()),
            "old": spread(got["old"]), "new": spread(got["new"]), "ratio": spread(ratios)}


# ---- main ------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="a git revision of this repository, or a built _C file")
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="wtype:dxD:keep:tokens ...")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--isa", help="force this ISA path in both builds (set_isa), e.g. avx2")
    p.add_argument("--in-flight", type=int, help="neurons in flight per thread in both builds (set_decode_tuning)")
    p.add_argument("--prefetch", type=int, help="prefetch distance in neurons in both builds (set_decode_tuning)")
    p.add_argument("--old-prefetch", type=int,
                   help="the old build's own prefetch distance (a change that moves the best setting: each at its own)")
    p.add_argument("--json", type=Path, help="also write the rows and the machine here")
    a = p.parse_args(argv)
    cases = [parse_case(c) for c in a.cases]
    old_path = Path(a.old) if Path(a.old).is_file() else build_revision(a.old)
    builds = {"old": load_build(old_path), "new": this_build}
    torch.set_num_threads(a.threads)
    for name, mod in builds.items():
        mod.set_num_threads(a.threads)
        if a.isa:
            mod.set_isa(a.isa)
        prefetch = a.old_prefetch if name == "old" and a.old_prefetch is not None else a.prefetch
        if a.in_flight or prefetch is not None:
            nf, pf = mod.get_decode_tuning()
            mod.set_decode_tuning(a.in_flight or nf, pf if prefetch is None else prefetch)
    info = machine_info()
    head = {name: {"file": str(getattr(mod, "__file__", "")), "isa": mod.get_isa(),
                   "decode_tuning": list(mod.get_decode_tuning())} for name, mod in builds.items()}
    print(f"{info.get('cpu', '?')}, {a.threads} threads, torch {torch.__version__}; " + "; ".join(
        f"{n}: {h['file']} ISA {h['isa']}, in flight / prefetch {h['decode_tuning']}" for n, h in head.items()),
        flush=True)
    print("\n| case | old GB/s | new GB/s | new / old, per round |\n|---|---|---|---|", flush=True)
    rows = []
    for case in cases:
        r = run_case(builds, case, a.rounds)
        rows.append(r)
        o, n, q = r["old"], r["new"], r["ratio"]
        print(f"| {r['case']} | {o['median']:.1f} ({o['min']:.1f}-{o['max']:.1f}) | {n['median']:.1f} "
              f"({n['min']:.1f}-{n['max']:.1f}) | {q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f}) |", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": info, "threads": a.threads, "rounds": a.rounds, "builds": head,
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
