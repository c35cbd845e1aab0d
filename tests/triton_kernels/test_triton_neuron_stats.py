"""Triton neuron_stats_ against an fp64 oracle; tolerance from torch's own fp32 computation."""

import pytest
import torch

import oracles
from glass_kernels.triton import neuron_stats_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# (B, T, D, impact form, mask): odd D (two masked 32-column blocks + a remainder), T = 1,
# T = 6 > the interpreter's 4-token tile, padding masks, an all-zero token.
CASES = [
    (1, 1, 45, False, False),
    (2, 6, 45, True, True),
    (3, 2, 33, False, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}D{}{}{}".format(
    *c[:3], "-impact" if c[3] else "", "-mask" if c[4] else ""))
def test_neuron_stats_matches_oracle(case, dtype, device):
    B, T, D, impact, masked = case
    gen = torch.Generator().manual_seed(300 + B * T + D)
    h = (3 * torch.randn(B, T, D, generator=gen)).to(dtype)
    if T > 1:
        h[-1, 1] = 0  # a token with ||h|| == 0 adds nothing
    h = h.to(device)
    down_norms = (torch.rand(D, generator=gen) + 0.5).to(device) if impact else None
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.uint8)
        mask[0, -1] = 0
        mask = mask.to(device)
    start = torch.rand(B, D, generator=gen).to(device)  # the op ADDS into out
    out = start.clone()
    res = neuron_stats_(h, down_norms, mask, out)
    assert res is out and res.dtype == torch.float32
    oracle = oracles.neuron_stats(h, down_norms, mask, start, torch.float64)
    native = oracles.neuron_stats(h, down_norms, mask, start, torch.float32)
    oracles.check(res, oracle, native, f"neuron_stats {case} {dtype}")
    try:
        import glass_kernels
        from glass_kernels import ops, reference
    except ImportError:  # the ops layer (issue 2) is not there yet
        return
    with glass_kernels.backend("triton"):  # validation + custom-op dispatch, same kernels
        via_ops = ops.neuron_stats(h, down_norms=down_norms, mask=mask, out=start.clone())
    assert torch.equal(via_ops, res)
    ref = reference.neuron_stats(h, down_norms, mask, start.clone())
    oracles.check(ref, oracle, native, f"reference.neuron_stats {case} {dtype}")


def test_neuron_stats_bool_mask_2d_and_accumulation(device):
    # [T, D] input; a bool mask; two chunks accumulate to the statistic of the whole prompt
    gen = torch.Generator().manual_seed(9)
    T, D = 5, 37
    h = torch.randn(T, D, generator=gen).to(torch.bfloat16).to(device)
    mask = torch.tensor([[True, False, True, True, True]], device=device)
    out = torch.zeros(1, D, device=device)
    neuron_stats_(h[:2], None, mask[:, :2], out)
    neuron_stats_(h[2:], None, mask[:, 2:], out)
    zero = torch.zeros(1, D, device=device)
    oracle = oracles.neuron_stats(h, None, mask, zero, torch.float64)
    native = oracles.neuron_stats(h, None, mask, zero, torch.float32)
    oracles.check(out, oracle, native, "neuron_stats chunked with bool mask")


def test_neuron_stats_deterministic(device):
    gen = torch.Generator().manual_seed(10)
    h = torch.randn(2, 7, 45, generator=gen).to(torch.bfloat16).to(device)
    a = neuron_stats_(h, None, None, torch.zeros(2, 45, device=device))
    b = neuron_stats_(h, None, None, torch.zeros(2, 45, device=device))
    assert torch.equal(a, b)
