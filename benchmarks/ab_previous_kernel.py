"""A/B in one process: another build of the extension (OLD, e.g. an earlier commit) against this
checkout's, alternating every round on the same cold layers (>= 1.2 GiB), 2 threads; GB/s of the
selected weight bytes, median of 7 rounds. Columns: OLD; this build at 1 neuron in flight (the
token-tile path); this build at 4 in flight.

    git worktree add /tmp/old <commit> && cmake -S /tmp/old -B /tmp/oldbuild -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DGLASS_BUILD_PYTHON=ON -DGLASS_BUILD_TESTS=OFF \
        -DPython_EXECUTABLE=$(which python) -Dpybind11_DIR=$(python -m pybind11 --cmakedir) \
        -DGLASS_PYTHON_OUTPUT_DIR=/tmp/oldpkg && cmake --build /tmp/oldbuild --target _C
    python benchmarks/ab_previous_kernel.py /tmp/oldpkg/_C.cpython-*.so
"""
import importlib.util, statistics, sys, time, types, torch
if len(sys.argv) != 2:
    raise SystemExit(__doc__)
sys.modules["glass_old"] = types.ModuleType("glass_old")  # the .so's init symbol is PyInit__C
spec = importlib.util.spec_from_file_location("glass_old._C", sys.argv[1])
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
import glass_kernels._C as new
torch.manual_seed(0)
for mod in (old, new): mod.set_num_threads(2)
def bench(d, D, dtype, keep, T=1):
    esz = torch.tensor([], dtype=dtype).element_size()
    L = max(4, int(1.2 * 2**30 // (3 * d * D * esz)))
    Ws = [[torch.randn(D, d).to(dtype) for _ in range(3)] for _ in range(L)]
    k = int(keep * D)
    idxs = [torch.randperm(D)[:k].sort().values.to(torch.int32) for _ in range(L)]
    x = torch.randn(1, T, d).to(dtype); y = torch.empty_like(x)
    dn = str(dtype).replace("torch.", "")
    def run(mod):
        t0 = time.perf_counter()
        for w, i in zip(Ws, idxs):
            mod.sparse_ffn(dn, "silu", x.data_ptr(), 1, T, d, w[0].data_ptr(), w[1].data_ptr(), w[2].data_ptr(), D, i.data_ptr(), k, False, y.data_ptr())
        return (time.perf_counter() - t0) / L
    res = {"old": [], "new1": [], "new4": []}
    for r in range(8):
        res["old"].append(run(old))
        new.set_decode_tuning(1, 0); res["new1"].append(run(new))
        new.set_decode_tuning(4, 0); res["new4"].append(run(new))
    sel = k * 3 * d * esz * T / T
    out = {n: sel / statistics.median(v[1:]) / 1e9 for n, v in res.items()}
    print(f"| {d}x{D} | {dn} | {keep} | T={T} | {out['old']:.1f} | {out['new1']:.1f} | {out['new4']:.1f} | {out['new1']/out['old']:.2f} |", flush=True)
print("| shape | dtype | keep | tokens | old GB/s | new, 1 in flight | new, 4 in flight | new1 / old |")
print("|---|---|---|---|---|---|---|---|")
for args in [(2048, 8192, torch.float32, 0.5), (2048, 8192, torch.bfloat16, 0.5), (576, 1536, torch.float32, 0.5),
             (576, 1536, torch.bfloat16, 0.5), (4096, 14336, torch.float32, 0.3)]:
    bench(*args)
bench(2048, 8192, torch.float32, 0.5, T=4)
bench(2048, 8192, torch.bfloat16, 0.5, T=4)
