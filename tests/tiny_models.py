"""Tiny random-weight Hugging Face models of every family glass_kernels patches (no downloads).

``build(family, **overrides)`` returns an eval-mode ``*ForCausalLM`` / ``*LMHeadModel`` built from a
config; sizes are small and deliberately odd (d = 40, D = 88) so that shape bugs show. Weights use a
larger init scale than the HF default (0.02), so that activations and neuron statistics are far
from linear / uniform and neuron choices matter. Shared with other test files.
"""

from __future__ import annotations

import torch

VOCAB = 96
D_MODEL = 40
D_FF = 88
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = D_MODEL // HEADS

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=D_MODEL,
    intermediate_size=D_FF,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=128,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**_COMMON, "hidden_act": "silu", **kw}))


def _mistral(**kw):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**{**_COMMON, "hidden_act": "silu", "sliding_window": None, **kw}))


def _qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**_COMMON, "hidden_act": "silu", **kw}))


def _qwen3(**kw):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**{**_COMMON, "hidden_act": "silu", "head_dim": HEAD_DIM, **kw}))


def _gemma(**kw):
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(
        GemmaConfig(**{**_COMMON, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                       "head_dim": HEAD_DIM, **kw})
    )


def _gemma2(**kw):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(
        Gemma2Config(**{**_COMMON, "hidden_activation": "gelu_pytorch_tanh", "head_dim": HEAD_DIM,
                        "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 64, **kw})
    )


def _gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(
        Gemma3TextConfig(**{**_COMMON, "hidden_activation": "gelu_pytorch_tanh", "head_dim": HEAD_DIM,
                            "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 64, **kw})
    )


def _phi3(**kw):
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**{**_COMMON, "hidden_act": "silu", "resid_pdrop": 0.0,
                                         "embd_pdrop": 0.0, "attention_dropout": 0.0, **kw}))


def _opt(**kw):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(
        vocab_size=VOCAB, hidden_size=D_MODEL, ffn_dim=D_FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=128, word_embed_proj_dim=D_MODEL,
        activation_function="relu", do_layer_norm_before=True, init_std=0.2, dropout=0.0,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return OPTForCausalLM(OPTConfig(**{**cfg, **kw}))


def _gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(
        vocab_size=VOCAB, n_embd=D_MODEL, n_inner=D_FF, n_layer=LAYERS, n_head=HEADS, n_positions=128,
        activation_function="gelu_new", initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **kw}))


BUILDERS = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "opt": _opt,
    "gpt2": _gpt2,
}
FAMILIES = tuple(BUILDERS)

# The FFN module class each family's handler matches, and its activation in ops terms.
FFN_CLASS = {
    "llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP",
    "gemma": "GemmaMLP", "gemma2": "Gemma2MLP", "gemma3": "Gemma3MLP", "phi3": "Phi3MLP",
    "opt": "OPTDecoderLayer", "gpt2": "GPT2MLP",
}
ACTIVATION = {
    "llama": "silu", "mistral": "silu", "qwen2": "silu", "qwen3": "silu", "gemma": "gelu_tanh",
    "gemma2": "gelu_tanh", "gemma3": "gelu_tanh", "phi3": "silu", "opt": "relu", "gpt2": "gelu_tanh",
}


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A tiny eval-mode causal LM of ``family`` with seeded random weights (eager attention)."""
    if family not in BUILDERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    overrides.setdefault("attn_implementation", "eager")
    model = BUILDERS[family](**overrides)
    # Gemma's RMSNorm weights start at 0 (scale 1 + w), others at 1: perturb all norms a little so
    # that they are not an identity, and randomize biases (HF zero-inits them) so bias handling is
    # really exercised.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


def random_stats(model: torch.nn.Module, seed: int = 0):
    """A GlobalStats with random positive statistics for ``model``'s FFN layers (full metadata)."""
    from glass_kernels.patch import find_ffn_sites
    from glass_kernels.stats import GlobalStats

    g = torch.Generator().manual_seed(seed)
    sites = find_ffn_sites(model)
    act = [torch.rand(s.D, generator=g) for s in sites]
    imp = [torch.rand(s.D, generator=g) for s in sites]
    return GlobalStats.for_model(model, act, imp, num_tokens=1000, source="random-test")
