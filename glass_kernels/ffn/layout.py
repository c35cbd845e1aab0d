"""Weight layouts that patch gives an FFN's parameters, and how the dense path reads them.

The decode kernels read neuron rows: neuron i's W_gate / W_up rows and its W_down column. Two layouts
serve them without a second copy of the weights (the parameters become views of the new storage):

* separate (``make_neuron_major``): every operand a contiguous [D, d] tensor; W_down's parameter
  becomes the transposed view of a contiguous W_down^T.
* neuron-bundled (``bundle``): one [D, n, d] block per layer, neuron i's n rows adjacent (gated:
  gate, up, down^T; non-gated: in, out^T), as the row-column bundling of "LLM in a Flash". Each
  parameter becomes a strided view of the block; the kernels take the row stride (n d) as ``ldw``.
  One selected neuron is then one contiguous read instead of n reads far apart.

``restore`` gives any of these parameters its original contiguous layout again, bit for bit.

Torch's own matmul may be slow on the views: on an AVX2 EPYC with torch 2.13, a bf16 ``F.linear``
whose weight is a transposed view ran 10-70x slower than on the contiguous weight. The prompt's
dense forward can therefore run on contiguous copies made one layer at a time
(``contiguous_params``), which is also exactly the unpatched model's arithmetic; whether that pays
is measured per machine (``glass_kernels.tuning.prompt_copy_for_model``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["bundle", "bundled_views", "contiguous_params", "is_bundled", "make_neuron_major", "restore",
           "huge_pages_copy", "separate", "to_huge_pages"]


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def empty_huge_pages(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` whose pages are asked to be transparent huge pages (Linux, CPU, >= 4 MiB),
    before anything touches them.

    Why: a sparse decode step reads a few KiB per selected neuron at scattered addresses; with 4 KiB
    pages each such read starts a new page for the hardware prefetcher (and the TLB). On the Xeon VM
    (THP in "madvise" mode, so only advised memory gets huge pages) cold sparse reads of bundled
    2048x8192 rows at keep 0.5 went from 28.3 to 29.2 GB/s (fp32) and 23.5 to 24.7 GB/s (bf16), A/B
    in alternation, 8 runs each; end to end on SmolLM2 the change was within noise. Elsewhere (no THP,
    another OS, a GPU) this is a plain ``torch.empty``; a refused advice changes nothing."""
    t = torch.empty(shape, dtype=dtype, device=device)
    n = t.numel() * t.element_size()
    if t.device.type != "cpu" or n < 2 * _HUGE_PAGE or not _libc_madvise():
        return t
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the whole huge pages inside the tensor
    end = (t.data_ptr() + n) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _libc_madvise()(start, end - start, _MADV_HUGEPAGE)
    return t


def huge_pages_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` (same shape, dtype, device and values) in memory from
    ``empty_huge_pages``: how every relaid or moved FFN weight gets its storage."""
    return empty_huge_pages(tuple(t.shape), t.dtype, t.device).copy_(t)


_madvise = None


def _libc_madvise():
    """libc's madvise (Linux only), or False."""
    global _madvise
    if _madvise is None:
        _madvise = False
        import sys

        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                _madvise = False
    return _madvise


def to_huge_pages(param: nn.Parameter) -> bool:
    """Move a contiguous CPU parameter's values into memory advised as huge pages (same shape, strides
    and values; the old storage is freed when the parameter lets go of it). For the operands that
    are already neuron-major [D, d] (W_gate, W_up, a fused gate_up), which the relayout leaves where
    the model loaded them: on the Xeon VM, separate fp32 rows read 5-7% faster cold with all three
    operands advised than with W_down alone (interleaved A/B, 2048x8192 keep 0.5 and 576x1536 keep
    0.3). Returns False where nothing moved (another device, not contiguous, too small, no madvise)."""
    t = param.data
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < 2 * _HUGE_PAGE \
            or not _libc_madvise():
        return False
    with torch.no_grad():
        param.data = huge_pages_copy(t)
    return True


def make_neuron_major(param: nn.Parameter) -> bool:
    """Store a [d, D] parameter as a contiguous [D, d] tensor; the parameter becomes its .t() view.

    One copy at a time (the old storage is freed when the parameter lets go of it), so patching
    never holds two copies of the FFN weights. Returns False if it already had that layout.
    """
    if param.dim() != 2 or param.t().is_contiguous():
        return False
    with torch.no_grad():
        param.data = huge_pages_copy(param.data.t()).t()
    return True


def _rows(p: torch.Tensor, neuron_is_column: bool) -> torch.Tensor:
    return p.t() if neuron_is_column else p


def bundled_views(rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copy n same-shape [D, d] tensors into one [D, n, d] block; returns its n [D, d] views
    (row stride n d), in order. The inputs are not changed."""
    D, d = rows[0].shape
    for r in rows[1:]:
        if r.shape != rows[0].shape or r.dtype != rows[0].dtype or r.device != rows[0].device:
            raise ValueError("bundled_views: every tensor must have the same shape, dtype and device")
    block = empty_huge_pages((D, len(rows), d), rows[0].dtype, rows[0].device)
    for j, r in enumerate(rows):
        block[:, j].copy_(r)
    return [block[:, j] for j in range(len(rows))]


def bundle(params: Sequence[tuple[nn.Parameter, bool]]) -> list[nn.Parameter]:
    """Give a layer's parameters the neuron-bundled layout in place.

    ``params``: (parameter, neuron_is_column) in block order; a parameter whose neurons are its
    columns ([d, D], e.g. W_down) becomes the transposed view of its block slot. The old storage is
    freed as each parameter lets go of it, so a layer is held twice only while it is copied.
    Returns the parameters changed (for ``restore``)."""
    with torch.no_grad():
        views = bundled_views([_rows(p.data, col) for p, col in params])
        for (p, col), v in zip(params, views):
            p.data = _rows(v, col)
    return [p for p, _ in params]


def separate(params: Sequence[tuple[nn.Parameter, bool]]) -> list[nn.Parameter]:
    """Undo ``bundle``: the separate neuron-major layout (rows contiguous [D, d]; a parameter whose
    neurons are columns becomes the transposed view of a contiguous [D, d]), each in memory advised
    as huge pages as the relayout gives it. Returns the parameters."""
    with torch.no_grad():
        for p, col in params:
            p.data = _rows(huge_pages_copy(_rows(p.data, col)), col)
    return [p for p, _ in params]


def is_bundled(params: Sequence[tuple[nn.Parameter, bool]]) -> bool:
    """Whether the parameters are the views of one [D, n, d] block, in order."""
    rows = [_rows(p.data, col) for p, col in params]
    n, d = len(rows), rows[0].shape[1]
    base = rows[0].data_ptr()
    es = rows[0].element_size()
    return all(r.stride() == (n * d, 1) and r.data_ptr() == base + j * d * es for j, r in enumerate(rows))


def restore(param: nn.Parameter) -> None:
    """A contiguous tensor again (the original layout of a transformers parameter), same values; a
    large CPU one in huge-page-advised memory, as the rest of the FFN's weights are after patch (so
    the model's pages do not change size between patch and unpatch)."""
    t = param.data
    if t.is_contiguous():
        return
    with torch.no_grad():
        param.data = huge_pages_copy(t)


@contextlib.contextmanager
def contiguous_params(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block, each parameter holds a contiguous copy of its values (the layout the
    unpatched model computes with); afterwards its view again. Costs one copy of these parameters."""
    saved = [p.data for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.data = p.data.contiguous()
        yield
    finally:
        for p, s in zip(params, saved):
            p.data = s
