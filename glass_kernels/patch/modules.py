"""GlassFFN: the module installed in place of a model's FFN while it is patched."""

from __future__ import annotations

import torch
from torch import nn

from ..ffn import FFNSite
from ..ffn.layout import contiguous_params


class GlassFFN(nn.Module):
    """Runs one FFN under the GLASS schedule (see ``schedule.GlassState``).

    Prompt phase: the family's dense forward (same operations as transformers), plus the local
    statistic of h accumulated per sequence. Decode phase: ``sparse_ffn`` / ``sparse_mlp`` with the
    sequence's neuron set, operands validated once per prompt (``GlassState.prepare``) so that the
    per-token path is one op call. It registers the original FFN's children (or parameters) under
    the same names, so ``state_dict`` keys and ``.to()`` are unchanged by patching.
    """

    replaces_ffn_site = True  # what glass_kernels.ffn recognises (it does not import this package)

    def __init__(self, site: FFNSite, state) -> None:
        super().__init__()
        for name, obj in site.handler.glass_children(site.module).items():
            if isinstance(obj, nn.Parameter):
                self.register_parameter(name, obj)
            else:
                self.add_module(name, obj)
        # Plain attributes (not submodules): the original module is restored by unpatch, and the
        # state is shared by every GlassFFN of the model.
        self.__dict__["site"] = site
        self.__dict__["state"] = state
        self.__dict__["originals"] = {}
        self.__dict__["relaid"] = []  # parameters the prompt forward copies to contiguous (set by patch)
        self.layer = site.layer
        self.kind = site.handler.kind
        self.flattens = getattr(site.handler, "flattens_tokens", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.sparse and not st.plan.runs_dense(self.layer):
            return st.sparse_forward(self.layer, x, self.flattens)
        site = self.site
        if st.quantized is not None:  # GlassConfig.weights: this layer dequantized for the forward
            with st.quantized[self.layer].dense_weights():
                return self._dense(site, st, x)
        # torch's GEMM may be slow on the relaid views (tuning.prompt_copy_for_model): from some
        # number of tokens on, a contiguous copy of this layer's weights costs less.
        if self.relaid and st.prompt_copy.applies(x.numel() // x.shape[-1]):
            with contiguous_params(self.relaid):
                return self._dense(site, st, x)
        return self._dense(site, st, x)

    def _dense(self, site: FFNSite, st, x: torch.Tensor) -> torch.Tensor:
        h = site.handler.hidden(site.module, x)
        if st.collect:
            st.accumulate(self.layer, h)
        return site.handler.output(site.module, h)

    def extra_repr(self) -> str:
        st, s = self.state, self.site
        c = st.config
        return (
            f"glass method={c.method}, keep={c.keep}, k={st.k[self.layer]}, D={s.D}, d={s.d}, "
            f"lam={c.effective_lam}, backend={c.backend}, activation={s.activation}"
        )
