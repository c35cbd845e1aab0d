"""The per-neuron statistic of docs/method.md, accumulated in one place for every caller.

For the FFN intermediate h of a forward ([B, T, D], or OPT's flattened [B*T, D]) it adds, per row b
and neuron i, sum over the counted tokens t of (v_t,i / ||v_t||)^2 into an fp32 [B, D] buffer, where
v = h (activation form) or v = h * ||W_down[:, i]|| (impact form). Masked tokens (padding) add
nothing; so does a token whose v is all zero. Used by calibration (the global statistic), the patch's
prompt phase (the local statistic) and, through the patch, the evaluation's oracle.
"""

from __future__ import annotations

import torch


def down_norms(site) -> torch.Tensor:
    """c_i = ||W_down[:, i]||_2 in fp32 [D]: the impact form's per-neuron scale."""
    w = site.handler.down_weight(site.module).detach()  # [d, D] logical
    return torch.linalg.vector_norm(w.float(), dim=0).contiguous()


def accumulate_statistic(h: torch.Tensor, out: torch.Tensor, *, batch: int, mask: torch.Tensor | None = None,
                         norms: torch.Tensor | None = None) -> None:
    """Add the statistic of ``h`` into ``out`` fp32 [batch, D] (``norms``: the impact form).

    ``mask``: bool [batch, T], True = the token counts (None: every token)."""
    from .. import ops  # lazy: the ops module loads the extension on first use

    D = h.shape[-1]
    h3 = h.reshape(batch, -1, D)
    if mask is not None:
        if tuple(mask.shape) != tuple(h3.shape[:2]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not cover the {tuple(h3.shape[:2])} tokens")
        if mask.device != h.device:
            mask = mask.to(h.device)
    if norms is not None and norms.device != h.device:
        norms = norms.to(h.device)
    ops.neuron_stats(h3, down_norms=norms, mask=mask, out=out)
