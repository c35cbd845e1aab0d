"""``state_dict()`` of a patched model: the FFN weights as plain tensors in their original layout.

Patching leaves the FFN parameters as views the decode kernel reads (W_down transposed into
neuron-major storage, or every neuron's rows bundled in one [D, n, d] block), or, with quantized rows
(``GlassConfig.weights``), releases them (no elements). Saving those as they are fails in the
serializers (a strided view) or, worse, writes empty tensors that only fail when loaded. So while a
model is patched, a state-dict hook replaces each FFN entry that is not a plain tensor:

* a strided view: by a contiguous copy (same values);
* a released parameter of quantized rows: by its dequantized weights in the original shape and
  dtype (the weights the patched model computes with; ``unpatch`` would give the same values).

``save_pretrained`` / ``torch.save(model.state_dict())`` then write an ordinary checkpoint that the
unpatched architecture loads. The copies exist while the state dict does (at most the FFN's float
weights once more); entries that already are plain contiguous tensors are passed through uncopied.

Loading goes the other way only where nothing the patch derived from the weights goes stale:
``load_state_dict`` with FFN weights is refused with a clear error when the model holds quantized
rows (the float parameters hold no elements: torch's size-mismatch message would name no cause) or
was patched with global statistics (they were checked against the weights they belong to, and would
silently steer the selection of other weights). Unpatch, load, and patch again.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def plain_weights_hook(model: nn.Module, sites, quantized) -> Callable:
    """The hook to register with ``model.register_state_dict_post_hook`` (see the module docstring);
    ``quantized``: the per-site QuantizedFFN list, or None."""
    by_param = {}
    for i, site in enumerate(sites):
        for p in site.handler.weight_params(site.module):
            by_param[id(p)] = quantized[i] if quantized else None

    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        dequantized: dict[int, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            key = prefix + name
            if id(p) not in by_param or key not in state_dict:
                continue
            q = by_param[id(p)]
            if q is not None:
                if id(p) not in dequantized:
                    dequantized.update(_dequantized(q))
                state_dict[key] = dequantized[id(p)]
            elif not state_dict[key].is_contiguous():
                state_dict[key] = state_dict[key].contiguous()

    return hook


def _dequantized(q) -> dict[int, torch.Tensor]:
    """id(param) -> its dequantized weights (fresh tensors) for one layer of quantized rows."""
    with q.dense_weights():
        return {id(p): p.detach().clone() for p in q.params}


def refuse_ffn_load_hook(model: nn.Module, sites, why: str, new_stats: bool) -> Callable:
    """A ``register_load_state_dict_pre_hook`` hook that raises when the incoming state dict holds
    FFN weights of the patched sites; ``why``: what the patch derived from them (for the message);
    ``new_stats``: the patch used global statistics, so patching again needs those of the new weights."""
    ffn = {id(p) for site in sites for p in site.handler.weight_params(site.module)}

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        keys = [prefix + name for name, p in model.named_parameters(remove_duplicate=False)
                if id(p) in ffn and prefix + name in state_dict]
        if keys:
            raise RuntimeError(
                f"load_state_dict would replace the FFN weights of a model patched by glass_kernels "
                f"({keys[0]}{f' and {len(keys) - 1} more' if len(keys) > 1 else ''}), which {why}. "
                "Unpatch first (glass_kernels.unpatch(model)), load, then patch again"
                + (" with statistics of the new weights" if new_stats else "") + ".")

    return hook
