"""fp64 oracles and torch-native baselines shared by the Triton tests.

Tolerances are derived, not tuned (style.md, flash-attention's rule): the kernel's max error
against an fp64 oracle may be at most twice the error of plain torch computing the same thing in
the same dtype (the HF-style compacted MLP: F.linear in that dtype), plus a tiny epsilon at fp32
resolution of the output's scale.
"""

from fractions import Fraction

import torch
import torch.nn.functional as F

ACTS = {
    "silu": F.silu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def rows_for(idx, b):
    return (idx[b] if idx.dim() == 2 else idx).long()


def ffn(x, w1, w3, wo, b1, bo, idx, activation, dtype):
    """Gated (w3 given) or non-gated FFN over the neurons idx, every op in ``dtype``.

    dtype float64 -> the oracle; the weights' dtype -> torch's own result (compacted copy + F.linear).
    """
    act = ACTS[activation]
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    ys = []
    for b in range(x3.shape[0]):
        r = rows_for(idx, b)
        xb = x3[b].to(dtype)
        g = F.linear(xb, w1[r].to(dtype), None if b1 is None else b1[r].to(dtype))
        h = act(g) * F.linear(xb, w3[r].to(dtype)) if w3 is not None else act(g)
        ys.append(F.linear(h, wo[r].to(dtype).t().contiguous(), None if bo is None else bo.to(dtype)))
    y = torch.stack(ys)
    return y.squeeze(0) if x.dim() == 2 else y


def neuron_stats(h, down_norms, mask, out, dtype):
    """out + sum_t (v_t / ||v_t||)^2 over kept tokens, in ``dtype`` (fp64 oracle or fp32 torch)."""
    h3 = h.unsqueeze(0) if h.dim() == 2 else h
    v = h3.to(dtype)
    if down_norms is not None:
        v = v * down_norms.to(dtype)
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    q = torch.where(n > 0, (v / torch.where(n > 0, n, 1)) ** 2, 0)
    if mask is not None:
        q = q * (mask.reshape(q.shape[:2]) != 0).to(dtype)[..., None]
    return out.to(dtype) + q.sum(dim=1)


def aggregate(row, global_rank, lam, fma=False):
    """Local ranks and a(i) of one row in IEEE float64; ``fma=True`` emulates a fused multiply-add
    (one rounding of lam * r^G + ((1 - lam) * r^L)), the result a contracting compiler would give."""
    D = len(row)
    g = [int(v) for v in global_rank]
    r_l = [0] * D
    for r, i in enumerate(sorted(range(D), key=lambda i: (-row[i], i))):
        r_l[i] = r + 1
    one_minus = 1.0 - lam
    if fma:
        a = [float(Fraction(lam) * g[i] + Fraction(one_minus * r_l[i])) for i in range(D)]
    else:
        a = [lam * g[i] + one_minus * r_l[i] for i in range(D)]  # Python floats: fp64, no FMA
    return a, r_l


def select_neurons(local, global_rank, lam, k, fma=False):
    """Plain-Python oracle of select_neurons (docs/method.md), independent of any tensor sort."""
    g = global_rank.tolist()
    out = []
    for row in local.reshape(-1, local.shape[-1]).tolist():
        a, r_l = aggregate(row, g, float(lam), fma)
        out.append(sorted(sorted(range(len(row)), key=lambda i: (a[i], r_l[i], i))[:k]))
    t = torch.tensor(out, dtype=torch.int32)
    return t.squeeze(0) if local.dim() == 1 else t


def check(out, oracle, torch_out, what):
    """Assert ``out`` is within 2x torch's own error (vs the fp64 oracle) plus a tiny epsilon."""
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - oracle).abs().max().item()
    torch_err = (torch_out.double() - oracle).abs().max().item()
    eps = 1e-6 * oracle.abs().max().item() + 1e-12
    assert err <= 2 * torch_err + eps, (
        f"{what}: max error {err:.3g} > 2 x torch's own error {torch_err:.3g} + {eps:.3g}")
    return err, torch_err
