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
    # No EOS during generate(): every test run produces exactly max_new_tokens tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
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


# ---- plain-torch references used by the patch tests (and usable for oracles elsewhere) ----------


def _cache_len(kwargs: dict) -> int:
    # Written out here rather than taken from glass_kernels.hf_compat: this is the test oracle.
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else int(cache.get_seq_length())


class NeuronMask:
    """Plain-torch reference of sparse decoding on an *unpatched* model.

    Forward pre-hooks on each FFN's intermediate module (down_proj / fc2 / c_proj) zero h outside
    the given per-layer sets (int [B, k] or [k]) while ``active``. With ``auto=True`` it is active
    exactly when the model's forward receives a non-empty KV cache (the GLASS decode phase).
    Use as a context manager; hooks are removed on exit.
    """

    def __init__(self, model, sets, auto: bool = False) -> None:
        from glass_kernels.patch import find_ffn_sites

        self.model, self.auto, self.active, self.batch = model, auto, False, None
        self.sites = find_ffn_sites(model)
        self.masks = []
        for site, s in zip(self.sites, sets):
            s = s.reshape(-1, s.shape[-1]).long()
            m = torch.zeros(s.shape[0], site.D, dtype=torch.bool)
            m.scatter_(1, s, True)
            self.masks.append(m)
        self.handles = []

    def __enter__(self):
        def top(module, args, kwargs):
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                x = kwargs["inputs_embeds"]
            self.batch = x.shape[0]
            if self.auto:
                self.active = _cache_len(kwargs) > 0

        self.handles.append(self.model.register_forward_pre_hook(top, with_kwargs=True))
        for site, m in zip(self.sites, self.masks):
            mod = site.handler.intermediate_module(site.module)

            def pre(mod, args, m=m, D=site.D):
                if not self.active:
                    return None
                h = args[0]
                hh = h.reshape(self.batch, -1, D)  # OPT's fc2 sees [B*T, D]
                keep = m.to(h.device)[:, None, :].to(h.dtype)
                return ((hh * keep).reshape(h.shape),) + tuple(args[1:])

            self.handles.append(mod.register_forward_pre_hook(pre))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def griffin_reference(model, ids, k_per_layer, attention_mask=None, impact=False):
    """GRIFFIN's neuron sets in plain torch (fp64): per layer, per sequence, the top-k of
    sum_t (h_t,i / ||h_t||)^2 over the prompt's non-padding tokens (ties -> lower index), sorted.
    With ``impact`` h_i is scaled by ||W_down[:, i]||. Returns (sets, stats) lists per layer."""
    from glass_kernels.patch import find_ffn_sites

    sites = find_ffn_sites(model)
    captured = [None] * len(sites)
    B = ids.shape[0]
    handles = []
    for l, site in enumerate(sites):
        def pre(mod, args, l=l, D=site.D):
            captured[l] = args[0].detach().reshape(B, -1, D).double()

        handles.append(site.handler.intermediate_module(site.module).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    sets, stats = [], []
    for l, site in enumerate(sites):
        h = captured[l]
        if impact:
            h = h * site.handler.down_weight(site.module).detach().double().norm(dim=0)
        n = h.norm(dim=-1, keepdim=True)
        q = torch.where(n > 0, (h / n) ** 2, torch.zeros_like(h))
        if attention_mask is not None:
            q = q * attention_mask[:, -h.shape[1]:, None].double()
        s = q.sum(1)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        sets.append(order[:, : k_per_layer[l]].sort(dim=1).values.to(torch.int32))
        stats.append(s)
    return sets, stats


def aggregate_reference(local: torch.Tensor, global_rank: torch.Tensor, lam: float, k: int) -> torch.Tensor:
    """docs/method.md's rank aggregation in plain Python/torch: a(i) = lam r_G(i) + (1 - lam) r_L(i),
    k smallest, ties -> better r_L then lower index; sorted int32 [B, k]."""
    B, D = local.shape
    out = []
    for b in range(B):
        order = torch.sort(local[b], descending=True, stable=True).indices
        rl = torch.empty(D, dtype=torch.long)
        rl[order] = torch.arange(1, D + 1)
        a = [lam * float(global_rank[i]) + (1 - lam) * float(rl[i]) for i in range(D)]
        best = sorted(range(D), key=lambda i: (a[i], int(rl[i]), i))[:k]
        out.append(torch.tensor(sorted(best), dtype=torch.int32))
    return torch.stack(out)


def assert_close_to_oracle(got, ref, oracle, what=""):
    """FlashAttention-style tolerance: ``got``'s error against the fp64 ``oracle`` may be at most
    2x plain torch's error (``ref``, same dtype as ``got``) plus a few ulps of the output scale."""
    oracle = oracle.double()
    err_got = (got.double() - oracle).abs().max().item()
    err_ref = (ref.double() - oracle).abs().max().item()
    eps = 4 * torch.finfo(got.dtype).eps * max(1.0, oracle.abs().max().item())
    assert err_got <= 2 * err_ref + eps, f"{what}: error {err_got:.3g} > 2 x torch's {err_ref:.3g} + {eps:.3g}"


def width_overrides(family: str, d: int) -> dict:
    """``build`` overrides that give ``family`` a model width d (e.g. a multiple of 32 for quantized rows)."""
    if family == "gpt2":
        return {"n_embd": d}
    if family == "opt":
        return {"hidden_size": d, "word_embed_proj_dim": d}
    return {"hidden_size": d}
