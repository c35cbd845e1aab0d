"""Pure-torch reference of every op: the oracle in tests and the fallback where no kernel exists.

Semantics are those of docs/architecture.md ("Semantics"); the C++ and Triton paths must match
these functions. Every op upcasts to fp32 (fp64 for the rank aggregation), computes, and casts
back, so the reference's own error is one rounding of the result plus fp32 accumulation error.
Inputs are assumed validated (glass_kernels.ops does that); idx may be int32 or int64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")


def activation_fn(name: str):
    """The elementwise activation named ``name`` (fp32 in, fp32 out)."""
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda g: F.gelu(g, approximate="tanh")
    if name == "gelu":
        return F.gelu  # exact erf form
    if name == "relu":
        return F.relu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _as3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp32, or fp64 when given fp64 (the tests' oracle)."""
    return t if t.dtype == torch.float64 else t.float()


def _per_sequence_rows(w: torch.Tensor, idx: torch.Tensor, B: int) -> torch.Tensor:
    """Gathered rows of w upcast, [B, k, d] (idx [k] shared or [B, k] per sequence)."""
    idx = idx.long()
    if idx.dim() == 1:
        return _acc(w.index_select(0, idx)).unsqueeze(0).expand(B, -1, -1)
    return _acc(w.index_select(0, idx.reshape(-1))).view(B, idx.shape[1], w.shape[1])


def sparse_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
               idx: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """y[b,t] = sum_{i in idx_b} act(W_gate[i].x) * (W_up[i].x) * W_down_t[i], fp32 accumulation."""
    act = activation_fn(activation)
    x3 = _acc(_as3d(x))
    B = x3.shape[0]
    g_rows = _per_sequence_rows(w_gate, idx, B)
    u_rows = _per_sequence_rows(w_up, idx, B)
    d_rows = _per_sequence_rows(w_down_t, idx, B)
    h = act(torch.bmm(x3, g_rows.transpose(1, 2))) * torch.bmm(x3, u_rows.transpose(1, 2))
    y = torch.bmm(h, d_rows)
    return y.to(x.dtype).view(x.shape)


def sparse_mlp(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out_t: torch.Tensor,
               b_out: torch.Tensor | None, idx: torch.Tensor, activation: str = "gelu") -> torch.Tensor:
    """y[b,t] = sum_{i in idx_b} act(W_in[i].x + b_in[i]) * W_out_t[i] + b_out, fp32 accumulation."""
    act = activation_fn(activation)
    x3 = _acc(_as3d(x))
    B = x3.shape[0]
    in_rows = _per_sequence_rows(w_in, idx, B)
    out_rows = _per_sequence_rows(w_out_t, idx, B)
    pre = torch.bmm(x3, in_rows.transpose(1, 2))
    if b_in is not None:
        li = idx.long()
        bi = _acc(b_in)[li]  # [k] or [B, k]
        pre = pre + (bi.unsqueeze(0) if li.dim() == 1 else bi).unsqueeze(1)
    y = torch.bmm(act(pre), out_rows)
    if b_out is not None:
        y = y + _acc(b_out)
    return y.to(x.dtype).view(x.shape)


# ---- quantized rows (glass_kernels.quant: ggml's Q8_0 / Q4_0 blocks of 32 values) ------------------

QBLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


def dequantize(q: torch.Tensor, wtype: str) -> torch.Tensor:
    """uint8 rows [R, nb * block_bytes] -> fp32 [R, nb * 32]: each value s * q (s the block's fp16 scale)."""
    bb = QBLOCK_BYTES[wtype]
    R = q.shape[0]
    blk = q.contiguous().reshape(R, -1, bb)
    s = blk[..., :2].contiguous().view(torch.float16).float()  # [R, nb, 1]
    raw = blk[..., 2:]
    if wtype == "q8_0":
        v = raw.contiguous().view(torch.int8).float()
    else:  # values 0..15 in the low nibbles, 16..31 in the high nibbles, offset 8
        v = torch.cat([(raw & 15).float(), (raw >> 4).float()], dim=-1) - 8.0
    return (v * s).reshape(R, -1)


def _dequantized_rows(w: torch.Tensor, idx: torch.Tensor, wtype: str, dtype: torch.dtype) -> torch.Tensor:
    """The selected rows only, dequantized ([k, d] or [B*k, d]); the full matrix is never expanded."""
    rows = dequantize(w.index_select(0, idx.long().reshape(-1)), wtype)
    return rows.to(dtype) if dtype == torch.float64 else rows


def sparse_ffn_q(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                 idx: torch.Tensor, activation: str, wtype: str) -> torch.Tensor:
    """sparse_ffn over quantized rows: the selected rows dequantized, then ``sparse_ffn`` in fp32."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    local = torch.arange(idx.numel(), device=idx.device).reshape(idx.shape)  # positions in the gathered rows
    g, u, d = (_dequantized_rows(w, idx, wtype, acc) for w in (w_gate, w_up, w_down_t))
    return sparse_ffn(x.to(acc), g, u, d, local, activation).to(x.dtype)


def sparse_mlp_q(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out_t: torch.Tensor,
                 b_out: torch.Tensor | None, idx: torch.Tensor, activation: str, wtype: str) -> torch.Tensor:
    """sparse_mlp over quantized rows (biases in x's dtype)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    local = torch.arange(idx.numel(), device=idx.device).reshape(idx.shape)
    wi, wo = (_dequantized_rows(w, idx, wtype, acc) for w in (w_in, w_out_t))
    bi = None if b_in is None else b_in.to(acc)[idx.long()].reshape(-1)
    bo = None if b_out is None else b_out.to(acc)
    return sparse_mlp(x.to(acc), wi, bi, wo, bo, local, activation).to(x.dtype)


def neuron_stats(h: torch.Tensor, down_norms: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-neuron sum over counted tokens of (v_i / ||v||_2)^2, v = h[b,t] (* down_norms); fp32 [B, D].

    Adds into ``out`` when given (and returns it). Tokens with ||v|| == 0 or mask == 0 add nothing.
    """
    h3 = _as3d(h)
    B, T, D = h3.shape
    v = _acc(h3)
    if down_norms is not None:
        v = v * _acc(down_norms)
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)  # fp32 [B, T, 1]
    keep = n > 0
    if mask is not None:
        keep = keep & (mask.reshape(B, T, 1) != 0)
    contrib = torch.where(keep, (v / torch.where(keep, n, torch.ones_like(n))) ** 2, torch.zeros_like(v))
    s = contrib.sum(dim=1)
    if out is None:
        return s if h.dtype == torch.float64 else s.float()
    out.view(B, D).add_(s)
    return out


def local_ranks(local: torch.Tensor) -> torch.Tensor:
    """r^L: 1-based rank of each neuron by descending score, ties -> lower index; int64 [B, D]."""
    B, D = local.shape
    # stable descending sort keeps equal scores in index order, so ties go to the lower index
    order = torch.sort(local, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, D + 1, dtype=order.dtype).expand(B, D).contiguous())
    return ranks


def aggregated_scores(local: torch.Tensor, global_rank: torch.Tensor, lam: float) -> torch.Tensor:
    """a(i) = lam * r^G(i) + (1 - lam) * r^L(i) in float64, two separately rounded products then a sum."""
    lam = float(lam)
    rl = local_ranks(local).double()
    rg = global_rank.double()
    # separate tensor ops: each product is rounded before the add (no FMA), as the contract requires
    return (lam * rg).unsqueeze(0) + (1.0 - lam) * rl


def select_neurons(local: torch.Tensor, global_rank: torch.Tensor, lam: float, k: int) -> torch.Tensor:
    """The k neurons with the smallest a(i) (ties -> better r^L, then lower index), sorted ascending, int32.

    local fp32 [B, D] (or [D], giving [k]); global_rank int [D] with 1 = most important.
    """
    squeeze = local.dim() == 1
    loc = local.unsqueeze(0) if squeeze else local
    loc = loc.float()
    a = aggregated_scores(loc, global_rank, lam)
    rl = local_ranks(loc)
    # r^L is a permutation, so ordering by (a, r^L) is total: visit neurons in r^L order and
    # stable-sort by a, which keeps equal a in r^L order (r^L ties cannot happen).
    by_local = torch.argsort(rl, dim=1)  # by_local[b, r-1] = neuron of local rank r
    a_in_local_order = torch.gather(a, 1, by_local)
    pos = torch.sort(a_in_local_order, dim=1, stable=True).indices[:, :k]
    chosen = torch.gather(by_local, 1, pos)
    idx = torch.sort(chosen, dim=1).values.to(torch.int32)
    return idx[0] if squeeze else idx



