"""Compile every Triton kernel variant for an NVIDIA target WITHOUT a GPU, and check the results.

The interpreter (CI) runs the kernels' semantics but not the GPU compiler: shapes that tl.dot
rejects, register spills of a config, or an FMA contracted into the float64 aggregation of
select_neurons only show up in the real compilation. ``triton.compile`` with a GPUTarget runs the
whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas) on any machine.

Checks, per variant: it compiles; registers and stack (spill) bytes from the bundled cuobjdump;
--strict fails on any stack use. select_neurons: compiled with FP fusion on (what torch.compile
uses), its float64 aggregation has no FMA with a non-zero addend, while the naive expression in
a control kernel does get contracted (proving the check can fail).

    python benchmarks/gpu/check_compile.py            # every autotune config, 3 dtypes (~3 min)
    python benchmarks/gpu/check_compile.py --quick    # one config per path (~15 s; tests run it)
    python benchmarks/gpu/check_compile.py --arch 80  # A100 instead of H100 (sm_90)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# Compilation needs real @triton.jit functions, not the interpreter's wrappers.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; its default

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from glass_kernels.triton.neuron_stats import _neuron_stats_kernel, _neuron_stats_norm_kernel  # noqa: E402
from glass_kernels.triton.select_neurons import _select_neurons_kernel  # noqa: E402
from glass_kernels.triton.sparse_ffn import (  # noqa: E402
    DOT_CONFIGS, QUANT_DOT_CONFIGS, _sparse_ffn_kernel, _sparse_ffn_reduce_kernel, bcast_configs,
    quant_bcast_configs)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_DT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _compile(fn, types: dict, consts: dict, arch: int, num_warps=4, num_stages=3, fp_fusion=True):
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    missing = [n for n in fn.arg_names if sig[n] == "constexpr" and n not in consts]
    assert not missing, f"{fn.__name__}: no type or value for {missing}"
    # the JIT's specialisation of pointers and of d: 16-divisible, so loads vectorise as they will
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in ("d", "D", "ldw")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   "enable_fp_fusion": fp_fusion})


def _usage(kernel) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def _ffn_types(dt: str, quantized: bool = False) -> dict:
    p = f"*{_DT[dt]}"
    w = "*u8" if quantized else p  # quantized rows: uint8 blocks (glass_kernels.quant)
    return {"x_ptr": p, "w1_ptr": w, "w3_ptr": w, "wo_ptr": w, "b1_ptr": p, "idx_ptr": "*i32",
            "part_ptr": "*fp32", "B": "i32", "T": "i32", "d": "i32", "ldw": "i32", "k": "i32",
            "idx_stride_b": "i32", "npp": "i32", "D_BUCKET": "i32", "K_BUCKET": "i32"}


def variants(quick: bool):
    """(name, fn, types, consts, num_warps, num_stages) of every launch the launchers can make."""
    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    for dt in dtypes + (["fp32"] if quick else []):
        for gated in ((True,) if quick and dt == "bf16" else (False,) if quick else (True, False)):
            act = 0 if gated else 2  # silu / gelu (erf)
            tiles = (1, 16) if quick and dt == "bf16" else (16,) if quick else (1, 2, 4, 8, 16)
            for bt in tiles:
                cfgs = DOT_CONFIGS if bt == 16 else bcast_configs(bt)
                if quick:
                    cfgs = [cfgs[0], cfgs[-1]] if bt == 1 else [cfgs[-1]]
                for c in cfgs:
                    consts = dict(GATED=gated, HAS_B1=not gated, ACT=act, BLOCK_T=bt, USE_DOT=bt == 16,
                                  DOT_F32=dt == "fp32", QTYPE=0, **c.kwargs)
                    name = (f"sparse_{'ffn' if gated else 'mlp'} {dt} T{bt} K{c.kwargs['BLOCK_K']} "
                            f"D{c.kwargs['BLOCK_D']} w{c.num_warps} s{c.num_stages}")
                    yield name, _sparse_ffn_kernel, _ffn_types(dt), consts, c.num_warps, c.num_stages
    # quantized rows (QTYPE 1 = Q8_0, 2 = Q4_0): gated, decode tile and the tl.dot tile
    for qtype, qname in ((1, "q8_0"), (2, "q4_0")):
        for dt in (["bf16"] if quick else ["bf16", "fp32"]):
            for bt in ((1, 16) if quick else (1, 2, 4, 8, 16)):
                cfgs = QUANT_DOT_CONFIGS if bt == 16 else quant_bcast_configs(bt)
                for c in ([cfgs[-1]] if quick else cfgs):
                    consts = dict(GATED=True, HAS_B1=False, ACT=0, BLOCK_T=bt, USE_DOT=bt == 16, DOT_F32=True,
                                  QTYPE=qtype, **c.kwargs)
                    name = (f"sparse_ffn_q {qname} x {dt} T{bt} K{c.kwargs['BLOCK_K']} D{c.kwargs['BLOCK_D']} "
                            f"w{c.num_warps} s{c.num_stages}")
                    yield name, _sparse_ffn_kernel, _ffn_types(dt, True), consts, c.num_warps, c.num_stages
    for dt in (["bf16", "fp16"] if quick else dtypes):
        p = f"*{_DT[dt]}"
        types = {"part_ptr": "*fp32", "bo_ptr": p, "y_ptr": p, "n_rows": "i32", "d": "i32", "n_split": "i32"}
        yield (f"sparse_ffn_reduce {dt}", _sparse_ffn_reduce_kernel, types,
               dict(HAS_BO=dt != "bf16", OUT_BF16=dt == "bf16", BLOCK_D=1024), 4, 3)
    for dt in (["bf16"] if quick else dtypes):
        p = f"*{_DT[dt]}"
        yield (f"neuron_stats_norm {dt}", _neuron_stats_norm_kernel,
               {"h_ptr": p, "dn_ptr": "*fp32", "mask_ptr": "*u8", "norm_ptr": "*fp32", "D": "i32"},
               dict(HAS_DN=True, HAS_MASK=True, BLOCK=1024), 4, 3)
        yield (f"neuron_stats {dt}", _neuron_stats_kernel,
               {"h_ptr": p, "dn_ptr": "*fp32", "norm_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "D": "i32"},
               dict(HAS_DN=True, BLOCK_T=16, BLOCK_D=128), 4, 3)


@triton.jit
def _naive_aggregate_kernel(order_ptr, grank_ptr, coef_ptr, a_ptr, D, BLOCK: tl.constexpr):
    # The control: the plain expression, which a contracting compiler turns into an FMA.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    r_g = tl.load(grank_ptr + tl.load(order_ptr + offs, mask=m, other=0), mask=m, other=0).to(tl.float64)
    r_l = (offs + 1).to(tl.float64)
    a = tl.load(coef_ptr) * r_g + tl.load(coef_ptr + 1) * r_l
    tl.store(a_ptr + offs, a, mask=m)


_FMA = re.compile(r"fma\.rn\.f64\s+[^,]+,\s*[^,]+,\s*[^,]+,\s*([^;]+);")


def _contracted(ptx: str) -> bool:
    """True if some f64 FMA adds something other than +0.0 (a product fused into the sum)."""
    return any(addend.strip() != "0d0000000000000000" for addend in _FMA.findall(ptx))


def check_select_no_fma(arch: int) -> tuple[bool, bool]:
    """(kernel contracted, control contracted), both compiled with fusion ON as torch.compile would."""
    types = {"order_ptr": "*i64", "grank_ptr": "*i32", "coef_ptr": "*fp64", "a_ptr": "*fp64", "D": "i32"}
    ours = _compile(_select_neurons_kernel, types, {"BLOCK": 1024}, arch, fp_fusion=True)
    control = _compile(_naive_aggregate_kernel, types, {"BLOCK": 1024}, arch, fp_fusion=True)
    return _contracted(ours.asm["ptx"]), _contracted(control.asm["ptx"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one or two configs per path")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90 = H100/H200)")
    ap.add_argument("--strict", action="store_true", help="fail on any register spill (stack bytes)")
    args = ap.parse_args(argv)
    failures = []
    t_all = time.perf_counter()
    for name, fn, types, consts, w, s in variants(args.quick):
        t0 = time.perf_counter()
        try:
            regs, stack = _usage(_compile(fn, types, consts, args.arch, w, s))
        except Exception as e:  # report every failing variant, not just the first
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"FAIL  {name}: {e}")
            continue
        flag = "SPILL" if stack else "ok   "
        print(f"{flag} {name:<48} regs {regs:>3}  stack {stack:>5} B  {time.perf_counter() - t0:5.1f} s")
        if stack and args.strict:
            failures.append(f"{name}: {stack} bytes of stack (spills)")
    ours, control = check_select_no_fma(args.arch)
    print(f"select_neurons fp64 aggregation contracted into an FMA (fusion on): kernel {ours}, "
          f"naive control {control}")
    if ours:
        failures.append("select_neurons: lam * r^G + (1 - lam) * r^L contracted into an FMA")
    if not control:
        failures.append("the naive control was not contracted: the FMA check would prove nothing")
    print(f"sm_{args.arch}: {len(failures)} failure(s), {time.perf_counter() - t_all:.1f} s")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
