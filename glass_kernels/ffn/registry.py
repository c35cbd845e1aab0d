"""Handler registry: which module classes are FFNs, and how to read and patch each family.

A handler is a small class per family, registered under the fully qualified names of the module
classes it understands (``transformers.models.llama.modeling_llama.LlamaMLP``). Matching by the
qualified name of ``type(module)`` needs no import of the modeling files and never matches a
look-alike class of the same short name from remote code. ``find_ffn_sites`` instantiates one
handler per matched module, so ``site.handler.d`` / ``.D`` / ``.activation`` describe that layer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn

from .layout import make_neuron_major, restore as restore_row_major  # noqa: F401  (re-exported)

__all__ = [
    "FFNHandler",
    "FFNSite",
    "UnsupportedModelError",
    "activation_name",
    "find_ffn_sites",
    "register_handler",
    "supported_classes",
]


class UnsupportedModelError(ValueError):
    """The model has no FFN module that glass_kernels knows how to patch."""


_REGISTRY: dict[str, type["FFNHandler"]] = {}


def register_handler(*qualnames: str) -> Callable[[type["FFNHandler"]], type["FFNHandler"]]:
    """Class decorator: register a handler for module classes given by qualified name."""

    def deco(cls: type[FFNHandler]) -> type[FFNHandler]:
        for q in qualnames:
            if q in _REGISTRY and _REGISTRY[q] is not cls:
                raise ValueError(f"a handler for {q} is already registered ({_REGISTRY[q].__name__})")
            _REGISTRY[q] = cls
        return cls

    return deco


def supported_classes() -> list[str]:
    """Short names of the module classes with a registered handler, sorted."""
    return sorted({q.rsplit(".", 1)[-1] for q in _REGISTRY})


def _qualname(module: nn.Module) -> str:
    t = type(module)
    return f"{t.__module__}.{t.__qualname__}"


def activation_name(act: nn.Module) -> str:
    """Map an activation module (HF ACT2FN entry or torch.nn) to the ops' activation string."""
    from transformers import activations as A  # transformers is only needed once a model is patched

    if isinstance(act, (A.SiLUActivation, nn.SiLU)):
        return "silu"
    # GELUTanh (gelu_pytorch_tanh) and NewGELUActivation (gelu_new) are the same tanh form.
    if isinstance(act, (A.GELUTanh, A.NewGELUActivation)):
        return "gelu_tanh"
    if isinstance(act, A.GELUActivation):
        return "gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, nn.ReLU):
        return "relu"
    raise UnsupportedModelError(
        f"unsupported FFN activation {type(act).__name__}; supported: silu, gelu_pytorch_tanh, "
        "gelu_new, gelu, relu"
    )


class FFNHandler:
    """How to read, run densely, relayout and (un)install one family's FFN.

    The stats engineer's contract (keep stable): ``intermediate_module(module)`` is the module
    whose forward's first input is h [..., D]; ``down_weight(module)`` is the logical [d, D] view
    of W_down / W_2; ``d``, ``D``, ``activation`` (ops string) describe the layer.

    kind "gated": h = act(W_gate x) * (W_up x), y = W_down h.
    kind "mlp":   h = act(W_in x + b_in),       y = W_out h + b_out.
    """

    kind: str = "gated"

    def __init__(self, module: nn.Module) -> None:
        self.check(module)
        self.d, self.D = self._sizes(module)
        self.activation = activation_name(self.act_module(module))

    # -- description ----------------------------------------------------------------------
    @property
    def row_elems(self) -> int:
        """Weight elements one neuron owns (what keeping it costs per decode step): gate, up and
        down rows of d (gated), or in and out rows of d plus a bias (mlp)."""
        return 3 * self.d if self.kind == "gated" else 2 * self.d + 1

    def check(self, module: nn.Module) -> None:
        """Raise UnsupportedModelError if this instance has a variant the ops cannot run."""

    def _sizes(self, module: nn.Module) -> tuple[int, int]:
        D, d = self.in_weight(module).shape
        return int(d), int(D)

    def act_module(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def intermediate_module(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def down_weight(self, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def in_weight(self, module: nn.Module) -> torch.Tensor:
        """[D, d] view of W_gate (gated) or W_in (mlp)."""
        raise NotImplementedError

    def weights(self, module: nn.Module) -> tuple:
        """The ops' operands, as views of the model's own storage (no copy).

        gated: (w_gate [D, d], w_up [D, d], w_down_t [D, d]);
        mlp:   (w_in [D, d], b_in [D] | None, w_out_t [D, d], b_out [d] | None).
        """
        raise NotImplementedError

    # -- dense forward, exactly the family's own operations --------------------------------
    def hidden(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- patching ---------------------------------------------------------------------------
    def glass_children(self, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        """What the GlassFFN registers under its own name, so state_dict keys do not change."""
        return dict(module.named_children())

    def relayout(self, module: nn.Module) -> list[nn.Parameter]:
        """Give the neuron-major operands contiguous [D, d] storage; the original parameter
        becomes its transposed view. Returns the parameters changed (for restore)."""
        return []

    def bundle_params(self, module: nn.Module) -> list[tuple[nn.Parameter, bool]] | None:
        """The parameters the neuron-bundled layout puts in one [D, n, d] block, in operand order
        (gated: gate, up, down; non-gated: in, out), each with whether its neurons are columns
        (a [d, D] weight such as W_down). None: this family cannot be bundled (a fused parameter)."""
        return None

    def weight_params(self, module: nn.Module) -> list[nn.Parameter]:
        """The FFN's weight parameters (not its biases): what quantized storage replaces."""
        params = self.bundle_params(module)
        if params is None:
            raise NotImplementedError(f"{type(self).__name__} must define weight_params")
        return [p for p, _ in params]

    def install(self, parent: nn.Module, attr: str, module: nn.Module, glass: nn.Module) -> None:
        setattr(parent, attr, glass)

    def uninstall(self, parent: nn.Module, attr: str, module: nn.Module, glass: nn.Module) -> None:
        setattr(parent, attr, module)


@dataclasses.dataclass
class FFNSite:
    """One FFN of the model, in model order."""

    name: str  # qualified module name (of the original module)
    layer: int  # 0-based, model order
    module: nn.Module  # the original FFN module (or the OPT decoder layer)
    handler: FFNHandler

    @property
    def d(self) -> int:
        return self.handler.d

    @property
    def D(self) -> int:
        return self.handler.D

    @property
    def activation(self) -> str:
        return self.handler.activation

    @property
    def parent_and_attr(self) -> tuple[str, str]:
        parent, _, attr = self.name.rpartition(".")
        return parent, attr


def installed_in_place(module: nn.Module) -> bool:
    """Whether ``module`` was installed in place of an FFN (glass_kernels.patch's GlassFFN, which keeps
    the replaced site in ``.site`` and the layer attributes it took over in ``.originals``)."""
    return bool(getattr(type(module), "replaces_ffn_site", False))


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, type[FFNHandler] | None]]:
    if installed_in_place(module):
        yield prefix, module, None
        return
    cls = _REGISTRY.get(_qualname(module))
    if cls is not None:
        yield prefix, module, cls
        return  # an FFN holds no further FFN
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def find_ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Every supported FFN of ``model``, in model order (also works on a patched model, where it
    returns the original modules). Raises UnsupportedModelError if there is none."""
    from . import families  # noqa: F401  (registers the built-in handlers)

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module instance, got {model!r}")
    sites: list[FFNSite] = []
    for name, module, cls in _walk(model, ""):
        if cls is None:  # an installed GlassFFN: report the site it replaced
            s = module.site
            sites.append(FFNSite(s.name, len(sites), s.module, s.handler))
        else:
            sites.append(FFNSite(name, len(sites), module, cls(module)))
    if not sites:
        raise UnsupportedModelError(
            f"no supported FFN module found in {type(model).__name__}; supported module classes: "
            + ", ".join(supported_classes())
        )
    return sites


# The instance attribute that holds a model's patch record (glass_kernels.patch): its presence means
# "patched". Defined here so that code reading FFNs (calibration) can tell without importing patch.
PATCH_ATTR = "_glass_patch"


def is_patched(model: nn.Module) -> bool:
    """Whether glass_kernels.patch has patched this model instance."""
    return isinstance(model, nn.Module) and model.__dict__.get(PATCH_ATTR) is not None
