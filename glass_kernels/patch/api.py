"""patch() / unpatch() / session(): GLASS on a Hugging Face model instance."""

from __future__ import annotations

import logging

from torch import nn

from .. import hf_compat
from .config import NEEDS_GLOBAL, GlassConfig
from .modules import GlassFFN
from ..ffn import find_ffn_sites
from ..ffn.layout import restore_layer
from .saving import plain_weights_hook, refuse_ffn_load_hook
from .schedule import GlassState, Session

logger = logging.getLogger("glass_kernels.patch")

from ..ffn.registry import PATCH_ATTR as _ATTR  # holds the patch record; its presence = patched


class _PatchRecord:
    def __init__(self, state, sites, relaid, hooks):
        self.state = state
        self.sites = sites
        self.relaid = relaid  # per site: parameters given another layout (restored by unpatch)
        self.hooks = hooks


def _calibrate_hint(method: str) -> str:
    return (
        f"method {method!r} needs global statistics: compute them once with "
        "`stats = glass_kernels.calibrate(model, tokenizer)` (then `stats.save(path)` / "
        "`glass_kernels.GlobalStats.load(path)`), or `python -m glass_kernels calibrate`, and pass "
        "`patch(model, stats=stats)`; `patch(model, stats=\"calibrate\", tokenizer=tok)` calibrates "
        "now; methods \"griffin\", \"random\" and \"dense\" need none"
    )


def patch(model: nn.Module, config: GlassConfig | None = None, stats=None, *, tokenizer=None,
          calibrate_options: dict | None = None, **overrides) -> nn.Module:
    """Patch ``model`` in place for GLASS decoding and return it.

    Args:
        model: a transformers model *instance* (e.g. ``LlamaForCausalLM``); the module whose
            forward receives the KV cache and ``attention_mask`` (the schedule hooks it).
        config: a GlassConfig (default ``GlassConfig()``); ``overrides`` replace its fields, e.g.
            ``patch(model, stats=s, method="griffin", keep=0.4)``.
        stats: a GlobalStats for this model (needed by "a-glass", "i-glass", "global"); it is
            checked against the model (``stats.check_model``). ``"calibrate"`` computes them now
            with ``glass_kernels.calibrate(model, tokenizer)``.
        tokenizer: only for ``stats="calibrate"``.
        calibrate_options: keyword arguments for that ``calibrate`` call (e.g. ``num_sequences``,
            ``seq_len``, ``progress``).

    Every supported FFN is replaced by a GlassFFN (shown by ``print(model)``); its weights get the
    layout the decode kernel reads (``GlassConfig.layout``: W_down (GPT-2: c_fc, OPT: fc2) as
    neuron-major storage, or every neuron's rows bundled in one [D, n, d] block), in place, the
    original parameters becoming views of it, so no weight is duplicated. The prompt's dense forward
    runs on the views, or on contiguous copies made a layer at a time where that measured faster
    (``session(model).prompt_copy``). Patching an already patched model raises RuntimeError:
    ``unpatch`` first. ``unpatch(model)`` restores the original modules and weight layout.
    While patched, ``state_dict()`` (and so ``save_pretrained``) gives the FFN weights as plain
    tensors in the original layout (dequantized where ``weights`` quantized them; patch/saving.py).

    Memory overhead (the weights are not copied; ``session(model).memory_overhead()`` reports
    it): per layer, int32 global ranks [D] (a-/i-glass, global) and fp32 ||W_down[:, i]|| [D]
    (i-glass); per prompt, fp32 local statistics [B, D] and int32 neuron sets [B, k]. Measured on
    SmolLM2-135M-Instruct (fp32, 513 MiB of parameters, 30 layers, D = 1536), B = 1, keep 0.5:
    a-glass 0.44 MiB (0.086% of the model), i-glass 0.62 MiB (0.12%); each further sequence of a
    batch adds 0.26 MiB. While patching, one layer's weights are briefly held twice (the relayout
    copy), 3.4 MiB (W_down) or 10.1 MiB (bundled) for SmolLM2; with prompt copies, one layer's
    relaid weights are copied for the duration of its prompt forward.
    """
    if isinstance(model, type) or not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module instance (not a class), got {model!r}")
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError(
            "model is already patched by glass_kernels; call glass_kernels.unpatch(model) before "
            "patching it again with another configuration"
        )
    if config is None:
        config = GlassConfig()
    elif not isinstance(config, GlassConfig):
        raise TypeError(f"config must be a GlassConfig, got {type(config).__name__}")
    if overrides:
        config = config.replace(**overrides)
    hf_compat.check_transformers()
    sites = find_ffn_sites(model)  # UnsupportedModelError if none

    if isinstance(stats, str):
        if stats != "calibrate":
            raise ValueError(f"stats must be a GlobalStats, None or \"calibrate\", got {stats!r}")
        if tokenizer is None:
            raise ValueError("stats=\"calibrate\" needs tokenizer=...")
        from ..calibrate import calibrate

        stats = calibrate(model, tokenizer, **(calibrate_options or {}))
    if config.method in NEEDS_GLOBAL:
        if stats is None:
            raise ValueError(_calibrate_hint(config.method))
        stats.check_model(model)
    elif stats is not None:
        stats.check_model(model)
    if config.adaptive:
        if stats is None:
            raise ValueError(f"lam={config.lam!r} / keep_split={config.keep_split!r} read the adaptive-selection "
                             "fit of the statistics file: pass stats=... (made by `calibrate --fit`)")
        stats.require_fit(f"GlassConfig(lam={config.lam!r}, keep_split={config.keep_split!r})")

    state = GlassState(model, sites, config, stats)
    installed, relaid = _install(model, sites, state)
    try:
        if config.weights is not None:
            _quantize(sites, state, config)
        else:
            _choose_layout(sites, installed, relaid, state, config)
    except BaseException:
        # every parameter the layouts may have touched (a failure may come half-way through bundling)
        _restore_layout(sites, relaid)
        for site, parent, attr, glass in reversed(installed):
            site.handler.uninstall(parent, attr, site.module, glass)
        raise
    hooks = [
        model.register_forward_pre_hook(state.pre_hook, with_kwargs=True),
        # always_call: the backend context opened by the pre-hook is closed even if forward raises.
        model.register_forward_hook(state.post_hook, with_kwargs=True, always_call=True),
        # state_dict() / save_pretrained: the FFN weights as plain tensors in their original layout
        model.register_state_dict_post_hook(plain_weights_hook(model, sites, state.quantized)),
    ]
    stale = [why for why, cond in (("holds them as quantized rows (its float parameters are released)",
                                    config.weights is not None),
                                   ("was patched with global statistics checked against them", stats is not None))
             if cond]
    if stale:  # new FFN weights would leave what the patch derived from them behind (patch/saving.py)
        hooks.append(model.register_load_state_dict_pre_hook(
            refuse_ffn_load_hook(model, sites, " and ".join(stale), new_stats=stats is not None)))
    _wrap_generate(model, state)
    model.__dict__[_ATTR] = _PatchRecord(state, installed, relaid, hooks)
    logger.info("glass_kernels: patched %d FFN layers of %s (%s)", len(sites), type(model).__name__, config)
    return model


def _install(model: nn.Module, sites, state: GlassState) -> tuple[list, list]:
    """Give each site's weights the neuron-major layout and put a GlassFFN in its place; all or
    nothing (a failure restores what was done). Returns (installed sites, relaid parameters)."""
    from ..ffn.layout import pack_huge_pages

    relaid, installed = [], []
    try:
        for site in sites:
            relaid.append(site.handler.relayout(site.module))
            if state.config.weights is None:  # (quantized rows replace the float weights anyway)
                pack_huge_pages(site.handler.weight_params(site.module))
            glass = GlassFFN(site, state)
            parent_name, attr = site.parent_and_attr
            parent = model.get_submodule(parent_name) if parent_name else model
            site.handler.install(parent, attr, site.module, glass)
            installed.append((site, parent, attr, glass))
    except Exception:
        for site, parent, attr, glass in reversed(installed):
            site.handler.uninstall(parent, attr, site.module, glass)
        _restore_layout(sites, relaid)
        raise
    return installed, relaid


def _choose_layout(sites, installed, relaid, state: GlassState, config: GlassConfig) -> None:
    """Decode tuning (which may time both layouts, converting the weights in place), the chosen
    layout applied, and whether the prompt forward runs on contiguous copies of the relaid weights."""
    from .. import tuning

    state.decode_tuning = t = tuning.tuning_for_model(sites, config.tune, config.keep, layout=config.layout)
    if tuning.bundle_params(sites) is not None:
        tuning.set_layout(sites, t.layout)
        if t.layout == "bundled":
            for i, s in enumerate(sites):
                seen = {id(p) for p in relaid[i]}
                relaid[i] += [p for p, _ in s.handler.bundle_params(s.module) if id(p) not in seen]
    state.prompt_copy = tuning.prompt_copy_for_model(sites, relaid[0], config.tune, t.layout)
    for (site, _, _, glass), params in zip(installed, relaid):
        glass.__dict__["relaid"] = params if state.prompt_copy.copy else []
    logger.info("glass_kernels: decode tuning %s; %s", t.describe(), state.prompt_copy.describe())


def _quantize(sites, state: GlassState, config: GlassConfig) -> None:
    """GlassConfig.weights: every FFN's weights become quantized neuron rows (patch/quantized.py)."""
    from .. import tuning
    from .quantized import quantize_sites, wtype_of

    state.quantized = quantize_sites(sites, wtype_of(config.weights))
    # measured on these rows (the float kernels' setting does not apply to them)
    state.decode_tuning = tuning.tuning_for_quantized(state.quantized, wtype_of(config.weights), config.tune,
                                                      config.keep)
    logger.info("glass_kernels: FFN weights quantized to %s (%.1f MiB of rows)", config.weights,
                sum(q.nbytes for q in state.quantized) / 2**20)


def _restore_layout(sites, relaid) -> None:
    """Every site's weight parameters back in their original contiguous layout, a layer at a time
    (``relaid[i]``: what site i's relayout and layout changes touched; its other weight parameters
    move with them, so the layer's storage from patch is released whole: ffn.layout.restore_layer)."""
    for i, site in enumerate(sites):
        params = list(relaid[i]) if i < len(relaid) else []
        seen = {id(p) for p in params}
        restore_layer(params + [p for p in site.handler.weight_params(site.module) if id(p) not in seen])


def _wrap_generate(model: nn.Module, state: GlassState) -> None:
    """Instance attributes (never the class) that tell the schedule where generate() is.

    * ``generate``: inside it, every forward after the prompt is a decode step, so one that arrives
      without a non-empty cache is counted and warned about (``GlassState.pre_hook``).
    * The prefill methods (``hf_compat.PREFILL_METHODS``): generate()'s prompt is a prompt whatever
      the cache holds -- it may be fed in chunks (``prefill_chunk_size``) or continue a cache passed
      in (multi-turn): forwards with a non-empty cache that still belong to the prompt.

    ``unpatch`` removes them.
    """
    if callable(getattr(model, "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = _counting_depth(model.generate, state, "generate_depth")
        prefill = hf_compat.prefill_methods(model)
        if not prefill:
            state.warn_once(
                "no-prefill",
                f"glass_kernels: transformers {hf_compat.transformers_version()} has none of "
                f"{hf_compat.PREFILL_METHODS} (glass_kernels.hf_compat.PREFILL_METHODS): generate() with "
                "prefill_chunk_size or with a cache passed in will treat later prompt chunks as decode steps",
            )
        for name in prefill:
            if name not in model.__dict__:
                model.__dict__[name] = _counting_depth(getattr(model, name), state, "prompt_depth")


def _counting_depth(method, state: GlassState, depth: str):
    """``method`` wrapped so that ``state.<depth>`` is > 0 while it runs (a fresh count per outermost call)."""

    def wrapper(*args, **kwargs):
        if depth == "generate_depth" and state.generate_depth == 0:
            state.generate_forwards = 0
        setattr(state, depth, getattr(state, depth) + 1)
        try:
            return method(*args, **kwargs)
        finally:
            setattr(state, depth, getattr(state, depth) - 1)

    wrapper.__wrapped__ = method
    wrapper.__doc__ = method.__doc__
    wrapper._glass_wrapper = True  # what _unwrap_generate removes (never a user's own attribute)
    return wrapper


def _unwrap_generate(model: nn.Module) -> None:
    for name in ("generate", *hf_compat.PREFILL_METHODS):
        if getattr(model.__dict__.get(name), "_glass_wrapper", False):
            del model.__dict__[name]


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original FFN modules and the original (row-major) weight layout."""
    rec = model.__dict__.get(_ATTR) if isinstance(model, nn.Module) else None
    if rec is None:
        raise ValueError("model is not patched by glass_kernels")
    for h in rec.hooks:
        h.remove()
    for site, parent, attr, glass in reversed(rec.sites):
        site.handler.uninstall(parent, attr, site.module, glass)
    for q in rec.state.quantized or []:  # the dequantized weights, in the original shape and dtype
        q.restore()
    _restore_layout([site for site, _, _, _ in rec.sites], rec.relaid)
    _unwrap_generate(model)
    rec.state.reset()
    del model.__dict__[_ATTR]
    return model


from ..ffn.registry import is_patched  # noqa: E402,F401  (re-exported: glass_kernels.patch.is_patched)


def session(model: nn.Module) -> Session:
    """The schedule handle of a patched model (see ``Session``)."""
    rec = model.__dict__.get(_ATTR) if isinstance(model, nn.Module) else None
    if rec is None:
        raise ValueError("model is not patched by glass_kernels: call glass_kernels.patch(model) first")
    return Session(rec.state)
