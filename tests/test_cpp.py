"""Builds the torch-free C++ core and its unit tests (GLASS_BUILD_PYTHON=OFF) in a temporary
directory and runs them through ctest: the scalar path and every vector path this CPU supports,
against a double-precision oracle (csrc/tests/test_main.cpp)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import backends

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: cannot build the C++ tests (pip install {name})")
    return path


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory):
    cmake = _tool("cmake")
    _tool("ninja")
    build = tmp_path_factory.mktemp("glass_cpp")
    subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DGLASS_BUILD_PYTHON=OFF", "-DGLASS_BUILD_TESTS=ON", "-DGLASS_BUILD_SHARED=ON"],
        check=True, capture_output=True, text=True)
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    res = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return build


def test_ctest(cpp_build):
    ctest = shutil.which("ctest") or _tool("ctest")
    res = subprocess.run([ctest, "--output-on-failure"], cwd=cpp_build, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_forced_scalar_path(cpp_build):
    # GLASS_ISA=scalar at load time forces the generic path (what users do to rule out a kernel).
    env = dict(os.environ, GLASS_ISA="scalar")
    exe = cpp_build / "glass_tests"
    res = subprocess.run([str(exe), "--isa-report"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(current scalar:" in res.stdout, res.stdout


# ---- the pybind11 module glass_kernels._C (pointers as ints, errors as Python exceptions) ----

def _ext():
    try:
        import glass_kernels._C as C
    except ImportError as e:  # not built: the pure-torch reference backend is used instead
        pytest.skip(f"glass_kernels._C is not built ({e})")
    return C


def test_ext_matches_torch_and_raises():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    C = _ext()
    assert "scalar" in C.supported_isas()
    assert C.get_isa() in C.supported_isas()
    g = torch.Generator().manual_seed(0)
    d, D, k = 37, 53, 11
    x = torch.randn(2, 3, d, generator=g, dtype=torch.float64)
    wg, wu, wdt = (torch.randn(D, d, generator=g, dtype=torch.float64) / d**0.5 for _ in range(3))
    idx = torch.randperm(D, generator=g)[:k].to(torch.int32)
    il = idx.long()
    ref = (F.silu(x @ wg[il].T) * (x @ wu[il].T)) @ wdt[il]  # fp64 oracle
    x32, g32, u32, d32 = (t.float().contiguous() for t in (x, wg, wu, wdt))
    y = torch.empty_like(x32)
    args = ("float32", "silu", x32.data_ptr(), 2, 3, d, g32.data_ptr(), u32.data_ptr(), d32.data_ptr(),
            D, idx.data_ptr(), k, False, y.data_ptr())
    C.sparse_ffn(*args)
    # Tolerance from torch's own fp32 error on the same computation, x2 plus a small epsilon.
    ref32 = (F.silu(x32 @ g32[il].T) * (x32 @ u32[il].T)) @ d32[il]
    tol = 2 * (ref32.double() - ref).abs().max().item() + 1e-6
    assert (y.double() - ref).abs().max().item() <= tol
    bad = idx.clone()
    bad[4] = D
    with pytest.raises(IndexError, match=r"idx\[4\]"):
        C.sparse_ffn(*args[:10], bad.data_ptr(), *args[11:])
    with pytest.raises(ValueError, match="dtype"):
        C.sparse_ffn("float64", *args[1:])
    with pytest.raises(ValueError, match="activation"):
        C.sparse_ffn("float32", "tanh", *args[2:])
    with pytest.raises(ValueError, match="k = 0"):
        C.sparse_ffn(*args[:11], 0, *args[12:])
    with pytest.raises(ValueError, match="is NULL"):
        C.sparse_ffn(*args[:2], 0, *args[3:])
    local = torch.rand(1, D, generator=g)
    rank = (torch.randperm(D, generator=g) + 1).to(torch.int32)
    out = torch.empty(1, k, dtype=torch.int32)
    with pytest.raises(ValueError, match="lam"):
        C.select_neurons(local.data_ptr(), 1, D, rank.data_ptr(), 1.5, k, out.data_ptr())
    C.select_neurons(local.data_ptr(), 1, D, rank.data_ptr(), 0.0, k, out.data_ptr())
    assert torch.equal(out[0], local[0].topk(k).indices.sort().values.to(torch.int32))


def test_ext_isa_and_threads():
    C = _ext()
    old_isa, old_n = C.get_isa(), C.get_num_threads()
    try:
        for isa in C.supported_isas():
            C.set_isa(isa)
            assert C.get_isa() == isa
            assert C.kernel_name("bfloat16") in {f"bf16_sparse_ffn__{k}" for k in backends.kernel_isas(isa, "bfloat16")}
        with pytest.raises(ValueError, match="isa"):
            C.set_isa("sse9")
        C.set_num_threads(3)
        assert C.get_num_threads() == 3
    finally:
        C.set_isa(old_isa)
        C.set_num_threads(old_n)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_ext_after_fork():
    # The core's thread pool must work in a forked child (DataLoader workers, servers): the child
    # has none of the parent's helper threads and starts a fresh pool.
    torch = pytest.importorskip("torch")
    C = _ext()
    old = C.get_num_threads()
    C.set_num_threads(2)
    try:
        d, D = 64, 256
        w = [torch.randn(D, d) for _ in range(3)]
        x = torch.randn(1, 1, d)
        idx = torch.arange(0, D, 2, dtype=torch.int32)
        y = torch.empty_like(x)

        def run():
            C.sparse_ffn("float32", "relu", x.data_ptr(), 1, 1, d, w[0].data_ptr(), w[1].data_ptr(),
                         w[2].data_ptr(), D, idx.data_ptr(), idx.numel(), False, y.data_ptr())
            return y.clone()

        parent = run()  # starts the pool in the parent
        pid = os.fork()
        if pid == 0:  # child: must not hang, must give the same bits
            ok = torch.equal(run(), parent)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        C.set_num_threads(old)
