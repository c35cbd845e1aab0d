"""FFN weights held as quantized neuron rows while a model is patched (``GlassConfig.weights``).

At patch time each layer's FFN operands (neuron-major [D, d] rows: gate, up, down^T; or in, out^T)
are quantized (glass_kernels.quant: ggml's Q8_0 / Q4_0 blocks) into one neuron-bundled
[D, n, row_bytes] uint8 block, and the float parameters are released (they hold no elements while patched,
so nothing can compute with them silently; ``state_dict`` / ``save_pretrained`` of the patched
model give their dequantized values instead, patch/saving.py): the model then holds the FFN
once, in 8 or 4.5 bits per weight.

* Decode steps read the selected rows through ``quant.sparse_ffn_q`` / ``sparse_mlp_q``.
* A dense forward (the prompt; every step of method "dense") dequantizes one layer at a time into
  scratch parameters in the original layout and runs the family's own forward on them
  (``dense_weights``), so the prompt sees exactly the weights the decode reads.
* ``unpatch`` gives every parameter its original shape, layout and dtype back, holding the
  dequantized values: the round trip changes the weights by the quantization error (measured in
  ``round_trip_error``; README, "Quantized rows").
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .. import quant
from ..ffn import FFNSite, find_ffn_sites
from ..ffn.layout import empty_huge_pages, empty_huge_pages_together, pack_huge_pages

WEIGHTS = {"int8": "q8_0", "q8_0": "q8_0", "int4": "q4_0", "q4_0": "q4_0"}


def wtype_of(weights: str) -> str:
    """The block format of a ``GlassConfig.weights`` value ("int8" = "q8_0", "int4" = "q4_0")."""
    return WEIGHTS[weights]


def _released(p: torch.Tensor) -> torch.Tensor:
    """What a released parameter holds: no elements (same dtype and device), so any use of it by
    code other than the GlassFFN fails with a shape error instead of computing with stale values."""
    return torch.empty(0, dtype=p.dtype, device=p.device)


class QuantizedFFN:
    """One FFN layer's weights as quantized, neuron-bundled rows; its float parameters released."""

    def __init__(self, site: FFNSite, wtype: str, block: torch.Tensor | None = None) -> None:
        """``block``: uint8 [D, n, row_bytes] storage to quantize into (``quantize_sites`` hands each
        layer its slice of one allocation); None: a new one."""
        h = site.handler
        if site.d % quant.BLOCK:
            raise ValueError(f"quantized weights need the model width d to be a multiple of {quant.BLOCK}; "
                             f"{site.name} has d = {site.d}")
        self.site, self.wtype = site, wtype
        self.params = h.weight_params(site.module)
        operands = tuple(h.weights(site.module))
        rows = operands if h.kind == "gated" else (operands[0], operands[2])
        self.device = rows[0].device
        self.dtype = rows[0].dtype
        with torch.no_grad():
            qrows = [quant.quantize(r, wtype) for r in rows]
            shape = (qrows[0].shape[0], len(qrows), qrows[0].shape[1])  # [D, n, row_bytes]
            if block is None:
                block = empty_huge_pages(shape, torch.uint8, qrows[0].device)
            elif tuple(block.shape) != shape or block.dtype != torch.uint8:
                raise ValueError(f"block must be uint8 {shape}, got {block.dtype} {tuple(block.shape)}")
            for j, q in enumerate(qrows):
                block[:, j].copy_(q)
            del qrows
        self.rows = [block[:, j] for j in range(block.shape[1])]
        self.biases = None if h.kind == "gated" else (operands[1], operands[3])
        self.shapes = [(p.shape, p.dtype) for p in self.params]
        for p in self.params:  # the float storage is freed here (the block above holds the weights)
            p.data = _released(p)

    @property
    def nbytes(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.rows)

    def operands(self) -> tuple:
        """The decode kernel's operands: quantized rows (and the float biases of non-gated FFNs)."""
        if self.biases is None:
            return tuple(self.rows)
        return (self.rows[0], self.biases[0], self.rows[1], self.biases[1])

    def _fill(self) -> None:
        """Give the parameters fresh storage in their original layout holding the dequantized values."""
        for p, (shape, dtype) in zip(self.params, self.shapes):
            p.data = torch.empty(shape, dtype=dtype, device=self.device)
        views = tuple(self.site.handler.weights(self.site.module))  # views of the new storage
        targets = views if self.biases is None else (views[0], views[2])
        with torch.no_grad():
            for t, q in zip(targets, self.rows):
                t.copy_(quant.dequantize(q, self.wtype).to(t.dtype))

    @contextlib.contextmanager
    def dense_weights(self) -> Iterator[None]:
        """Within the block the parameters hold the dequantized weights (one layer's worth of scratch)."""
        self._fill()
        try:
            yield
        finally:
            for p in self.params:
                p.data = _released(p)

    def restore(self) -> None:
        """For unpatch: the parameters get the dequantized weights for good (original shape and dtype),
        in one huge-page-advised allocation as the float weights of a patched layer are (so that the
        dense model after unpatch reads pages of the same size as before patch)."""
        self._fill()
        pack_huge_pages(self.params)


def quantize_sites(sites, wtype: str) -> list[QuantizedFFN]:
    """Quantize every site, one layer at a time, into one huge-page-advised allocation (a layer's
    block of a small model, 2.7 MiB for SmolLM2 in Q8_0, would leave a quarter of its bytes in the
    partial last huge page; the blocks live and die together); all or nothing (a failure restores
    what was done)."""
    done: list[QuantizedFFN] = []
    blocks = _blocks(sites, wtype)
    try:
        for s, b in zip(sites, blocks):
            done.append(QuantizedFFN(s, wtype, b))
    except BaseException:
        for q in done:
            q.restore()
        raise
    return done


def _blocks(sites, wtype: str) -> list[torch.Tensor | None]:
    """Per site a uint8 [D, n, row_bytes] slice of one allocation on the sites' common device (each
    slice starting on a 64-byte boundary); Nones (each layer allocates its own) where the sites
    differ in device, where a width is not a whole number of blocks (QuantizedFFN then says so)."""
    devices = {s.handler.weights(s.module)[0].device for s in sites}
    if len(devices) != 1 or any(s.d % quant.BLOCK for s in sites):
        return [None] * len(sites)
    shapes = [(s.D, 3 if s.handler.kind == "gated" else 2, quant.row_bytes(wtype, s.d)) for s in sites]
    return empty_huge_pages_together([(shape, torch.uint8) for shape in shapes], devices.pop())


class FloatWeights:
    """A copy of a model's FFN weights, to put back after ``unpatch`` of quantized rows (which leaves
    the dequantized values): for callers that patch the same float model again, e.g. with statistics
    computed on it (the evaluation, the end-to-end benchmark). Costs one copy of the FFN weights."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(p, p.detach().clone()) for s in find_ffn_sites(model) for p in s.handler.weight_params(s.module)]

    def put_back(self) -> None:
        with torch.no_grad():
            for p, w in self.saved:
                p.copy_(w)


def round_trip_error(original: list[torch.Tensor], restored: list[nn.Parameter]) -> dict[str, float]:
    """max |w - w'| / max |w| and the relative RMS error over the given weights (for reports)."""
    num = den = 0.0
    worst = 0.0
    for a, b in zip(original, restored):
        a32, b32 = a.float(), b.detach().float()
        num += float(((a32 - b32) ** 2).sum())
        den += float((a32 ** 2).sum())
        worst = max(worst, float((a32 - b32).abs().max() / a32.abs().max().clamp_min(1e-30)))
    return {"max_rel": worst, "rms_rel": (num / max(den, 1e-30)) ** 0.5}
