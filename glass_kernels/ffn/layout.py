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
import math
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["bundle", "bundled_views", "contiguous_params", "is_bundled", "make_neuron_major", "restore",
           "restore_layer", "empty_huge_pages_together", "huge_pages_copy", "huge_pages_copies", "pack_huge_pages",
           "separate", "to_huge_pages"]


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def empty_huge_pages(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` whose pages are asked to be transparent huge pages (Linux, CPU, >= 2 MiB),
    before anything touches them.

    Why: a sparse decode step reads a few KiB per selected neuron at scattered addresses; with 4 KiB
    pages each such read starts a new page for the hardware prefetcher (and the TLB). On the Xeon VM
    (THP in "madvise" mode, so only advised memory gets huge pages) a 1 GiB read ran 1.22-1.23x
    faster from huge pages, the gathered decode of separate fp32 rows 1.20x (2048x8192) and 1.16x
    (576x1536), and torch's dense FFN 1.24x and 1.08x (``benchmarks/ab_huge_pages.py``, 2026-12-07,
    medians of 8 pairs).

    The tensor starts on a 2 MiB boundary: its storage is over-allocated by less than 2 MiB of
    address space that is never touched (so never backed by memory), and the advice runs to the
    tensor's end rounded up to a whole huge page where that backs at most 1/16 more memory than the
    tensor needs, else rounded down (the tail then stays in 4 KiB pages). A tensor of 2-4 MiB (one
    SmolLM2 FFN weight: 3.4 MiB) used to get no huge page at all, as advice only takes whole aligned
    pages. Elsewhere (no THP, another OS, a GPU) this is a plain ``torch.empty``; a refused advice
    changes nothing."""
    nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < _HUGE_PAGE or not _libc_madvise():
        return torch.empty(shape, dtype=dtype, device=device)
    tail = -nbytes % _HUGE_PAGE
    advised = nbytes + tail if tail <= nbytes // 16 else nbytes - nbytes % _HUGE_PAGE
    buf = _fresh_pages(max(nbytes, advised) + _HUGE_PAGE)
    start = -buf.data_ptr() % _HUGE_PAGE
    _libc_madvise()(buf.data_ptr() + start, advised, _MADV_HUGEPAGE)
    return buf[start:start + nbytes].view(dtype).view(tuple(int(n) for n in shape))


def _fresh_pages(nbytes: int) -> torch.Tensor:
    """A uint8 tensor over a new anonymous mapping (unmapped when the tensor is freed).

    Why not torch.empty: its memory comes from malloc, which hands out a few-MiB block from pages an
    earlier tensor already touched (glibc raises its mmap threshold up to 32 MiB as large blocks are
    freed), and advice does not turn pages that exist into huge pages: on the Xeon VM only 35% of
    the advised memory of 40 freshly quantized 2.7 MiB blocks became huge pages. A new mapping has
    no pages yet, so the advice applies at the first touch."""
    import mmap

    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=torch.uint8)  # holds the mapping until the tensor is freed


def huge_pages_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` (same shape, dtype, device and values) in memory from
    ``empty_huge_pages``: how a relaid or moved FFN weight gets its storage."""
    return empty_huge_pages(tuple(t.shape), t.dtype, t.device).copy_(t)


def empty_huge_pages_together(specs: Sequence[tuple[tuple[int, ...], torch.dtype]], device) -> list[torch.Tensor]:
    """Empty tensors of the given (shape, dtype)s, back to back (each starting on a 64-byte boundary)
    in one ``empty_huge_pages`` allocation.

    Why one allocation: the operands of a small model's layer are each a few MiB (SmolLM2: 3.4 MiB),
    so each in its own allocation would end in a partial huge page left in 4 KiB pages; together
    they fill whole pages. For tensors that live and die together (a layer's operands, which patch,
    a layout change and unpatch replace at once; a model's quantized blocks), so that no tensor's
    bytes outlive their use."""
    nbytes = [math.prod(int(n) for n in shape) * dtype.itemsize for shape, dtype in specs]
    sizes = [-(-n // 64) * 64 for n in nbytes]
    buf = empty_huge_pages((sum(sizes),), torch.uint8, device)
    out, at = [], 0
    for (shape, dtype), n, size in zip(specs, nbytes, sizes):
        out.append(buf[at:at + n].view(dtype).view(tuple(int(m) for m in shape)))
        at += size
    return out


def huge_pages_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of ``tensors`` (same shapes, dtypes and values) in one allocation
    (``empty_huge_pages_together``; the tensors on one device)."""
    out = empty_huge_pages_together([(tuple(t.shape), t.dtype) for t in tensors], tensors[0].device)
    with torch.no_grad():
        for o, t in zip(out, tensors):
            o.copy_(t)
    return out


def _pack(items: Sequence[tuple[nn.Parameter, torch.Tensor, bool]]) -> None:
    """For each (parameter, source, transposed): the parameter becomes a contiguous copy of
    ``source`` (its transpose where ``transposed``), all the copies in one allocation
    (``huge_pages_copies``)."""
    copies = huge_pages_copies([src for _, src, _ in items])
    for (param, _, transposed), c in zip(items, copies):
        param.data = c.t() if transposed else c


def pack_huge_pages(params: Sequence[nn.Parameter]) -> bool:
    """Move one layer's CPU parameters, each contiguous or the transposed view of a contiguous
    tensor, into one huge-page-advised allocation (``_pack``), each keeping its shape, strides and
    values. Returns False where nothing moved (another device, another layout, too small in all,
    no madvise)."""
    params = list(params)
    if not params or any(p.device.type != "cpu" for p in params) or not _libc_madvise() \
            or sum(p.numel() * p.element_size() for p in params) < _HUGE_PAGE:
        return False
    if not all(p.data.is_contiguous() or p.data.t().is_contiguous() for p in params if p.dim() == 2) \
            or not all(p.data.is_contiguous() for p in params if p.dim() != 2):
        return False
    _pack([(p, p.data if p.data.is_contiguous() else p.data.t(), not p.data.is_contiguous()) for p in params])
    return True


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
    """Move a contiguous CPU parameter of at least one huge page (2 MiB) into memory advised as huge
    pages (same shape, strides and values; the old storage is freed when the parameter lets go of
    it). For a parameter on its own (the vLLM plugin's fused gate_up, a benchmark's other weights);
    a layer's FFN weights go together (``pack_huge_pages``). Returns False where nothing moved
    (another device, not contiguous, too small, no madvise)."""
    t = param.data
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < _HUGE_PAGE \
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
    neurons are columns becomes the transposed view of a contiguous [D, d]), together in one
    huge-page-advised allocation as patch gives a layer's operands. Returns the parameters."""
    _pack([(p, _rows(p.data, col), col) for p, col in params])
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


def restore_layer(params: Sequence[nn.Parameter]) -> None:
    """``restore`` for all of one layer's weight parameters at once: if any is not contiguous, every
    one of them becomes a contiguous copy in one huge-page-advised allocation (``_pack``; the
    contiguous ones move too, so the storage patch gave the layer is released whole)."""
    params = list(params)
    if all(p.data.is_contiguous() for p in params):
        return
    if any(p.device.type != "cpu" for p in params) or not _libc_madvise():
        for p in params:
            restore(p)
        return
    _pack([(p, p.data, False) for p in params])


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
