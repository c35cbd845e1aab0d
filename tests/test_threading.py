"""Where the C++ core's threads come from (glass.h: glass_set_threading): the core's own pool, or the
process's OpenMP team, which inside torch is torch's own (glass_kernels/_ext.py chooses it)."""

import os
import subprocess
import sys

import pytest
import torch

from glass_kernels import _ext, ops

C = _ext.load()
pytestmark = pytest.mark.skipif(C is None, reason="the C++ extension is not built")


def _shares_torch_openmp() -> bool:
    return "OpenMP" in torch.__config__.parallel_info() and _ext.shares_torch_runtime(
        _ext._openmp_runtimes(), os.path.dirname(torch.__file__))


def test_which_runtimes_count_as_shared():
    t = "/env/site-packages/torch"
    assert _ext.shares_torch_runtime({f"{t}/lib/libgomp.so.1"}, t)
    # another wheel's renamed private copy (vLLM's environment: sentencepiece) binds to nobody else
    assert _ext.shares_torch_runtime({f"{t}/lib/libgomp.so.1",
                                      "/env/site-packages/sentencepiece.libs/libgomp-6a29c32d.so.1.0.0"}, t)
    # torch with a private copy: the core's libgomp.so.1 would be a second runtime
    assert not _ext.shares_torch_runtime({f"{t}/lib/libgomp-a34b3233.so.1", "/usr/lib/libgomp.so.1"}, t)
    assert not _ext.shares_torch_runtime({"/usr/lib/libgomp.so.1", "/opt/intel/libiomp5.so"}, t)
    assert not _ext.shares_torch_runtime(None, t)


def test_the_core_runs_on_torchs_openmp_team_when_it_shares_the_runtime():
    if not _shares_torch_openmp():
        pytest.skip("torch does not use the same OpenMP runtime as the core here")
    assert _ext.threading() == "openmp"


def test_the_environment_decides_when_set():
    code = "import torch; from glass_kernels import _ext; print(_ext.threading())"
    env = dict(os.environ, GLASS_THREADING="pool")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pool"


def test_both_threadings_give_the_same_bits(rng):
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: nothing runs in parallel")
    x = torch.randn(1, 1, 96, generator=rng)
    w = [torch.randn(300, 96, generator=rng) for _ in range(3)]
    idx = torch.randperm(300, generator=rng)[:150].sort().values.to(torch.int32)
    before = C.get_threading()
    try:
        outs = {}
        for how in ("pool", "openmp"):
            try:
                C.set_threading(how)
            except RuntimeError:  # a core built without OpenMP
                continue
            outs[how] = ops.sparse_ffn(x, *w, idx)
    finally:
        C.set_threading(before)
    assert len({tuple(y.flatten().tolist()) for y in outs.values()}) == 1


def test_bad_threading_is_named():
    with pytest.raises(ValueError, match="threading must be 'pool' or 'openmp'"):
        C.set_threading("threads")
