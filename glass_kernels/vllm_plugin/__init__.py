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
Keys of the "glass" object: glass_kernels.vllm_plugin.config. One rank (tensor_parallel_size 1),
vLLM's CPU backend; prefix caching and speculative decoding must be off.
"""

from __future__ import annotations

__all__ = ["register", "glass_state"]


def register() -> None:
    """vLLM's plugin entry point: install the (inert until configured) hooks."""
    from .hooks import install_hooks

    install_hooks()


def glass_state(model):
    """The ServingState serving a vLLM model (None if GLASS is off), e.g. from ``LLM.apply_model``."""
    from .hooks import _ATTR

    return model.__dict__.get(_ATTR)
