"""One small handler per FFN family, keyed by the transformers module class.

Each handler's dense path repeats its family's own forward operation for operation (checked
against transformers' modeling files), so a patched model's prefill computes what the
original computes, with h exposed for the local statistics.
"""

from __future__ import annotations

from torch import nn

from .registry import (
    FFNHandler,
    UnsupportedModelError,
    installed_in_place,
    make_neuron_major,
    register_handler,
)

_T = "transformers.models"


@register_handler(
    f"{_T}.llama.modeling_llama.LlamaMLP",
    f"{_T}.mistral.modeling_mistral.MistralMLP",
    f"{_T}.qwen2.modeling_qwen2.Qwen2MLP",
    f"{_T}.qwen3.modeling_qwen3.Qwen3MLP",
    f"{_T}.gemma.modeling_gemma.GemmaMLP",
    f"{_T}.gemma2.modeling_gemma2.Gemma2MLP",
    f"{_T}.gemma3.modeling_gemma3.Gemma3MLP",
)
class GatedMLPHandler(FFNHandler):
    """gate_proj / up_proj / down_proj nn.Linear + act_fn (Llama, Mistral, Qwen2/3, Gemma 1/2/3)."""

    kind = "gated"

    def check(self, module: nn.Module) -> None:
        for lin in (module.gate_proj, module.up_proj, module.down_proj):
            if lin.bias is not None:
                raise UnsupportedModelError(
                    f"{type(module).__name__} with biases (mlp_bias=True) is not supported: "
                    "ops.sparse_ffn has no bias terms"
                )

    def act_module(self, module):
        return module.act_fn

    def intermediate_module(self, module):
        return module.down_proj

    def down_weight(self, module):
        return module.down_proj.weight

    def in_weight(self, module):
        return module.gate_proj.weight

    def weights(self, module):
        return (module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight.t())

    def hidden(self, module, x):
        return module.act_fn(module.gate_proj(x)) * module.up_proj(x)

    def output(self, module, h):
        return module.down_proj(h)

    def relayout(self, module):
        p = module.down_proj.weight
        return [p] if make_neuron_major(p) else []

    def bundle_params(self, module):
        return [(module.gate_proj.weight, False), (module.up_proj.weight, False), (module.down_proj.weight, True)]


@register_handler(f"{_T}.phi3.modeling_phi3.Phi3MLP")
class Phi3MLPHandler(FFNHandler):
    """Fused gate_up_proj [2D, d] (gate = first D rows, up = last D rows) + down_proj."""

    kind = "gated"

    def check(self, module):
        if module.gate_up_proj.bias is not None or module.down_proj.bias is not None:
            raise UnsupportedModelError("Phi3MLP with biases is not supported: ops.sparse_ffn has no bias terms")
        if module.gate_up_proj.weight.shape[0] % 2:
            raise UnsupportedModelError("Phi3MLP.gate_up_proj must have an even number of output rows")

    def _sizes(self, module):
        two_D, d = module.gate_up_proj.weight.shape
        return int(d), int(two_D // 2)

    def act_module(self, module):
        return module.activation_fn

    def intermediate_module(self, module):
        return module.down_proj

    def down_weight(self, module):
        return module.down_proj.weight

    def in_weight(self, module):
        return module.gate_up_proj.weight[: self.D]

    def weights(self, module):
        w = module.gate_up_proj.weight
        # Row halves of a contiguous [2D, d] tensor are contiguous views: no copy.
        return (w[: self.D], w[self.D :], module.down_proj.weight.t())

    def weight_params(self, module):
        return [module.gate_up_proj.weight, module.down_proj.weight]

    def hidden(self, module, x):
        up_states = module.gate_up_proj(x)
        gate, up_states = up_states.chunk(2, dim=-1)
        return up_states * module.activation_fn(gate)

    def output(self, module, h):
        return module.down_proj(h)

    def relayout(self, module):
        p = module.down_proj.weight
        return [p] if make_neuron_major(p) else []


@register_handler(f"{_T}.gpt2.modeling_gpt2.GPT2MLP")
class GPT2MLPHandler(FFNHandler):
    """Conv1D c_fc (weight [d, D]) / c_proj (weight [D, d]) with biases, act (gelu_new)."""

    kind = "mlp"

    def _sizes(self, module):
        d, D = module.c_fc.weight.shape
        return int(d), int(D)

    def act_module(self, module):
        return module.act

    def intermediate_module(self, module):
        return module.c_proj

    def down_weight(self, module):
        return module.c_proj.weight.t()  # Conv1D stores [in, out] = [D, d]

    def in_weight(self, module):
        return module.c_fc.weight.t()

    def weights(self, module):
        return (module.c_fc.weight.t(), module.c_fc.bias, module.c_proj.weight, module.c_proj.bias)

    def hidden(self, module, x):
        return module.act(module.c_fc(x))

    def output(self, module, h):
        return module.dropout(module.c_proj(h))

    def relayout(self, module):
        p = module.c_fc.weight  # [d, D] -> neuron-major [D, d] storage; c_proj already is
        return [p] if make_neuron_major(p) else []

    def bundle_params(self, module):
        return [(module.c_fc.weight, True), (module.c_proj.weight, False)]  # Conv1D: [in, out]


class GlassPassthrough(nn.Module):
    """Stands in for OPT's activation_fn / fc2 while patched: the GlassFFN installed as fc1 has
    already computed the whole FFN. It keeps the replaced module's parameters registered under
    the same names, so the state_dict keys and .to() keep working."""

    def __init__(self, replaced: nn.Module, role: str) -> None:
        super().__init__()
        self.role = role
        for name, p in replaced.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def forward(self, x):
        return x

    def extra_repr(self) -> str:
        return f"glass passthrough for {self.role}"


@register_handler(f"{_T}.opt.modeling_opt.OPTDecoderLayer")
class OPTLayerHandler(FFNHandler):
    """OPT's FFN lives inline in the decoder layer: fc1 -> activation_fn -> fc2 (ReLU, biases).

    Patching replaces fc1 by the GlassFFN (which runs the whole FFN) and activation_fn / fc2 by
    passthroughs, rather than the layer's forward: the layer's own code (layer norms, dropout,
    residual) stays transformers' code. The layer flattens tokens to [B*T, d] before fc1; the
    GlassFFN restores [B, T, d] from the schedule's batch size for per-sequence work.
    """

    kind = "mlp"
    flattens_tokens = True

    @staticmethod
    def _orig(layer, attr):
        g = layer.fc1
        if installed_in_place(g):
            return g.originals[attr]
        return getattr(layer, attr)

    def act_module(self, module):
        return self._orig(module, "activation_fn")

    def intermediate_module(self, module):
        return self._orig(module, "fc2")

    def down_weight(self, module):
        return self._orig(module, "fc2").weight

    def in_weight(self, module):
        return self._orig(module, "fc1").weight

    def weights(self, module):
        fc1, fc2 = self._orig(module, "fc1"), self._orig(module, "fc2")
        return (fc1.weight, fc1.bias, fc2.weight.t(), fc2.bias)

    def hidden(self, module, x):
        return self._orig(module, "activation_fn")(self._orig(module, "fc1")(x))

    def output(self, module, h):
        return self._orig(module, "fc2")(h)

    def glass_children(self, module):
        # Registered as the GlassFFN's own parameters so that "layers.i.fc1.weight" keeps its key.
        return dict(self._orig(module, "fc1").named_parameters(recurse=False))

    def relayout(self, module):
        p = self._orig(module, "fc2").weight
        return [p] if make_neuron_major(p) else []

    def bundle_params(self, module):
        return [(self._orig(module, "fc1").weight, False), (self._orig(module, "fc2").weight, True)]

    def install(self, parent, attr, module, glass):
        glass.originals = {"fc1": module.fc1, "activation_fn": module.activation_fn, "fc2": module.fc2}
        module.fc2 = GlassPassthrough(module.fc2, "fc2")
        module.activation_fn = GlassPassthrough(module.activation_fn, "activation_fn")
        module.fc1 = glass

    def uninstall(self, parent, attr, module, glass):
        o = glass.originals
        module.fc1, module.activation_fn, module.fc2 = o["fc1"], o["activation_fn"], o["fc2"]
