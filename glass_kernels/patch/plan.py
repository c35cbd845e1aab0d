"""The decode plan: for the current neuron sets, each layer's sparse call with its operands validated
once (per prompt), so that a decode step is one prevalidated op call per layer.

The operands are views of the model's own weights ("gather": the kernel reads the selected rows in
place), or a per-prompt copy of the selected rows ("compact": see GlassConfig.strategy).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..ffn import FFNSite


def _ops():
    from .. import ops  # lazy: the ops module loads the extension on first use

    return ops


def compact_copy(operands: tuple, idx: torch.Tensor, kind: str) -> tuple[tuple, torch.Tensor]:
    """The selected neurons' rows copied into contiguous buffers, and the indices that read them all.

    Reading the copy with idx = 0..k-1 runs the same kernel over the same rows in the same order, so
    the result is bitwise that of reading them in place; only the memory access pattern differs."""
    rows = idx.long()
    every = torch.arange(idx.numel(), dtype=torch.int32, device=idx.device)
    if kind == "gated":
        return tuple(w.index_select(0, rows) for w in operands), every
    w_in, b_in, w_out_t, b_out = operands
    return (w_in.index_select(0, rows), None if b_in is None else b_in.index_select(0, rows),
            w_out_t.index_select(0, rows), b_out), every


class DecodePlan:
    """Per layer (op, operands, int32 idx, activation) for the sets ``neurons`` ([R, k] per layer)."""

    def __init__(self, sites: Sequence[FFNSite], neurons: Sequence[torch.Tensor], compact: bool,
                 quantized: Sequence | None = None) -> None:
        ops = _ops()
        self.strategy = "compact" if compact else "gather"
        self.calls = []
        for layer, (site, idx) in enumerate(zip(sites, neurons)):
            h = site.handler
            if idx.shape[0] == 1:
                idx = idx[0]  # one set shared by every row (any batch size)
            if quantized is not None:  # GlassConfig.weights: quantized rows (patch/quantized.py)
                self.calls.append(self._quantized_call(quantized[layer], idx, h))
                continue
            if _every_neuron(idx, site.D):
                # every neuron in order (keep 1.0, or a layer the fitted keep split keeps whole): the
                # layer's dense forward reads the same bytes, and is the dense model's result exactly
                self.calls.append(None)
                continue
            operands = tuple(h.weights(site.module))
            idx = idx.to(operands[0].device).contiguous()
            if compact:
                operands, idx = compact_copy(operands, idx, h.kind)
            # validate_* check every operand and the idx range once, and return the int32
            # contiguous idx that the prevalidated (per-token) functions require.
            if h.kind == "gated":
                idx = ops.validate_sparse_ffn_operands(*operands, idx, h.activation)
                fn = ops.sparse_ffn_prevalidated
            else:
                idx = ops.validate_sparse_mlp_operands(*operands, idx, h.activation)
                fn = ops.sparse_mlp_prevalidated
            self.calls.append((fn, operands, idx, h.activation))

    @staticmethod
    def _quantized_call(q, idx: torch.Tensor, h) -> tuple:
        from functools import partial

        from .. import quant

        operands = q.operands()
        idx = quant.validate_operands(operands, idx.to(q.device), h.activation, q.wtype, h.kind == "gated", q.dtype)
        fn = quant.sparse_ffn_q_prevalidated if h.kind == "gated" else quant.sparse_mlp_q_prevalidated
        return (partial(fn, wtype=q.wtype), operands, idx, h.activation)

    def runs_dense(self, layer: int) -> bool:
        """Whether this layer keeps every neuron and so runs its dense forward."""
        return self.calls[layer] is None

    def forward(self, layer: int, x: torch.Tensor, batch: int, flattens: bool) -> torch.Tensor:
        fn, operands, idx, act = self.calls[layer]
        if flattens:  # OPT hands the FFN [B*T, d]
            y = fn(x.reshape(batch, -1, x.shape[-1]).contiguous(), *operands, idx, act)
            return y.view(x.shape)
        return fn(x.contiguous(), *operands, idx, act)  # no copy when already contiguous

    def copy_nbytes(self) -> int:
        """Bytes of the compacted copies (0 when gathering in place)."""
        if self.strategy != "compact":
            return 0
        return sum(t.numel() * t.element_size() for c in self.calls if c is not None for t in c[1][:3]
                   if t is not None)


def _every_neuron(idx: torch.Tensor, D: int) -> bool:
    """idx ([k] or [R, k]) lists 0..D-1 in order in every row."""
    if idx.shape[-1] != D:
        return False
    return bool((idx == torch.arange(D, dtype=idx.dtype, device=idx.device)).all())
