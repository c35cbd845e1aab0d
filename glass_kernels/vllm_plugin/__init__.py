"""GLASS inside vLLM: per-request neuron sets under continuous batching.

Install the plugin's dependency (vLLM's CPU build lives in its own venv; see README, "Serving with
vLLM") and switch GLASS on per engine through vLLM's ``additional_config``::

    from vllm import LLM
    llm = LLM(model=folder, dtype="float32", enable_prefix_caching=False,
              additional_config={"glass": {"method": "a-glass", "keep": 0.5, "stats": "stats.safetensors"}})

    vllm serve FOLDER --no-enable-prefix-caching \\
        --additional-config '{"glass": {"keep": 0.5, "stats": "stats.safetensors"}}'

vLLM calls ``register`` (entry point ``vllm.general_plugins``) in every process it starts; that
only installs the hooks (glass_kernels.vllm_plugin.hooks), which do nothing for an engine whose
``additional_config`` has no "glass" key. With it, each request's prompt runs dense and adds to its
own statistic, the request's neurons are chosen when it starts decoding, and its generated tokens
run the sparse kernel with its own set beside other requests' sets (glass_kernels.vllm_plugin.state).
Keys of the "glass" object: glass_kernels.vllm_plugin.config. Tensor parallel: every rank gathers
a request's statistics, ranks all neurons as one rank would and keeps the chosen ones it holds, so
TP 2 decodes with TP 1's sets. Tested on vLLM's CPU backend; prefix caching, speculative decoding
and pipeline parallelism must be off.
"""

from __future__ import annotations

__all__ = ["register", "glass_state", "describe", "request_sets"]


def register() -> None:
    """vLLM's plugin entry point: install the (inert until configured) hooks."""
    from .hooks import install_hooks

    install_hooks()


def glass_state(model):
    """The ServingState serving a vLLM model (None if GLASS is off), e.g. from ``LLM.apply_model``."""
    from .hooks import _ATTR

    return model.__dict__.get(_ATTR)


def request_sets(model) -> dict:
    """ServingState.request_sets() of a vLLM model ({} if GLASS is off), for ``LLM.apply_model``
    (tensor parallel: one dict per rank, each with the neuron ids that rank holds)."""
    state = glass_state(model)
    return {} if state is None else state.request_sets()


def describe(model) -> dict:
    """What serves a vLLM model's FFNs, as plain data: ``LLM.apply_model(describe)`` (a module-level
    function, so vLLM can send it to its worker process). Keys: threads (torch's, in the worker),
    ffn_bytes_dense (every gated MLP's weight bytes, what a dense decode step reads), glass (on/off)
    and, with GLASS on, ServingState.summary()."""
    import torch

    dense = 0
    for m in model.modules():
        if all(hasattr(m, a) for a in ("gate_up_proj", "down_proj", "act_fn")):
            # from the layer's sizes: stock vLLM on CPU frees the weight after packing it for oneDNN
            down = m.down_proj
            elem = torch.empty(0, dtype=down.params_dtype).element_size()
            dense += 3 * down.input_size_per_partition * down.output_size_per_partition * elem
    out = {"threads": torch.get_num_threads(), "ffn_bytes_dense": dense}
    state = glass_state(model)
    out["glass"] = state is not None
    if state is not None:
        out.update(state.summary())  # counters: decode_steps and ffn_bytes_read (the FFN rows they read)
    return out
