"""``calibrate()``: the global statistics of docs/method.md, from self-generated (NPS) or user text.

NPS ("the model's own text", the paper's best variant):

* prompt: the BOS token alone (``prompt="bos"``, default -- also for chat models, as in the
  project's prototype) or the model's empty chat prompt (``prompt="chat"``: the chat template applied
  to one user turn with empty content, with the generation prompt -- transformers refuses a
  conversation without messages; for SmolLM2 that is its default system turn, an empty user turn and
  ``<|im_start|>assistant``);
* ancestral sampling at temperature 1.0 from the full distribution (no top-k, no top-p), by inverse
  CDF with one ``torch.Generator`` per sequence seeded from (``seed``, sequence index): the same seed
  and model give the same tokens, whatever ``batch_size`` (up to float rounding of batched matmuls);
* ``num_sequences`` sequences of ``seq_len`` tokens (prompt included), ``batch_size`` at a time.
  A sequence that samples EOS stops there: EOS and everything after it are excluded, so the token
  count can be below ``num_sequences * seq_len`` (``stats.num_tokens`` says how many were used).

The statistics are accumulated *while* generating, by forward pre-hooks on each FFN's
``intermediate_module`` (whose input is h): every token the dense model is fed -- the prompt, then
each sampled token -- adds ``(h_i / ||h||)^2`` (activation) and ``(c_i h_i / ||c * h||)^2`` (impact,
c_i = ||W_down[:, i]||) to the layer's fp32 sums, through ``glass_kernels.ops.neuron_stats``.  With a
KV cache each token passes through the FFNs exactly once, so this equals a separate dense forward
over the finished sequences (test_calibrate checks it) at half the cost.

Text (``source=[str, ...]`` or a path to a UTF-8 text file): the documents are tokenised without
special tokens, joined with EOS between documents, cut into pieces of ``seq_len - 1`` tokens, and each
piece is fed after a BOS token (so text and NPS statistics see the same first token); the last piece
may be shorter (padding excluded by the mask).  ``num_sequences=None`` uses the whole text.

Default sizes (``num_sequences=64, seq_len=256, batch_size=32``, ~16k tokens, 512 batched decode
steps): the target is 1-2 minutes for SmolLM2-135M in fp32 on 2 idle CPU cores, NOT yet measured on an
idle machine -- on the shared 2-core development machine under a load average of ~10, 8 x 64 tokens
took 143 s.  The prototype that the issue quotes used 128 x 256.  Smaller runs (``num_sequences=16,
seq_len=128``) are what the tests and a quick demo use.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import torch

from .hf_compat import cache_kwargs, output_cache
from .stats import GlobalStats

__all__ = ["calibrate", "generate_nps", "accumulate_stats", "StatsAccumulator", "text_chunks"]

logger = logging.getLogger(__name__)

DEFAULT_NUM_SEQUENCES = 64
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 32


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class StatsAccumulator:
    """Forward pre-hooks that add each FFN layer's per-token statistics into fp32 [D] sums.

    Use as a context manager around dense forwards of ``model``; set :attr:`mask` ([B, T] bool,
    True = count the token) before each forward (``None`` counts every token).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from .ffn import down_norms, find_ffn_sites, is_patched

        if is_patched(model):
            raise ValueError(
                "calibrate needs the dense model, but this model is patched by glass_kernels: "
                "calibrate before patching, or glass_kernels.unpatch(model) first"
            )
        self.model = model
        self.sites = find_ffn_sites(model)
        self.activation = [torch.zeros(s.handler.D, dtype=torch.float32) for s in self.sites]
        self.impact = [torch.zeros(s.handler.D, dtype=torch.float32) for s in self.sites]
        self.down_norms = [down_norms(s) for s in self.sites]  # the impact form's scale, once per layer
        self.mask: torch.Tensor | None = None
        self.num_tokens = 0
        self._handles: list = []

    def _hook(self, layer: int):
        def pre(module, args):
            from .ffn import accumulate_statistic

            h = args[0]
            mask = self.mask
            # OPT's decoder layer flattens the tokens (fc2 sees [B*T, D]): the mask's rows say B.
            B = mask.shape[0] if mask is not None else (h.shape[0] if h.dim() == 3 else 1)
            if h.dim() not in (2, 3):
                raise ValueError(f"layer {layer}: FFN intermediate must be [B, T, D], got {tuple(h.shape)}")
            for sums, norms in ((self.activation, None), (self.impact, self.down_norms[layer])):
                out = torch.zeros(B, h.shape[-1], dtype=torch.float32, device=h.device)
                accumulate_statistic(h, out, batch=B, mask=mask, norms=norms)
                sums[layer] += out.sum(0).cpu()

        return pre

    def count(self, n: int) -> None:
        self.num_tokens += int(n)

    def __enter__(self) -> "StatsAccumulator":
        for site in self.sites:
            mod = site.handler.intermediate_module(site.module)
            self._handles.append(mod.register_forward_pre_hook(self._hook(site.layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------------------
# NPS: the model's own text
# --------------------------------------------------------------------------------------------------

def _nps_prompt(tokenizer, prompt: str) -> list[int]:
    if prompt == "bos":
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError(
                "prompt='bos' needs a tokenizer with a BOS token, this one has none; use prompt='chat' "
                "(chat models) or a text source (source=[...] or a file)"
            )
        return [int(bos)]
    if prompt == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("prompt='chat' needs a tokenizer with a chat template; use prompt='bos'")
        # transformers refuses a conversation without messages, so the "empty chat" is one user turn
        # with empty content, then the assistant's generation prompt.
        from .models import prompt_ids

        ids = prompt_ids(tokenizer, "", chat=True)
        if not ids:
            raise ValueError("the empty chat prompt of this tokenizer is empty; use prompt='bos'")
        return [int(t) for t in ids]
    raise ValueError(f"prompt must be 'bos' or 'chat', got {prompt!r}")


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                   "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return {int(i) for i in ids}


def _sequence_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    # One stream per sequence (not per batch): sequence i gets the same uniforms whatever the batch
    # size, so the NPS corpus does not depend on batch_size (up to float rounding of batched matmuls).
    return torch.Generator(device=device).manual_seed((int(seed) * 0x9E3779B1 + int(index)) % (2**63))


def _sample(logits: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Ancestral sampling at temperature 1 over the full vocabulary, by inverse CDF: one uniform per
    row from that row's generator, the first token whose cumulative probability exceeds it.
    Tokens of probability 0 are never drawn (their CDF step is empty)."""
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    cdf = cdf / cdf[:, -1:]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=logits.device) for g in gens])
    idx = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)
    return idx.clamp_(max=logits.shape[-1] - 1)


@torch.inference_mode()
def generate_nps(
    model: torch.nn.Module,
    tokenizer,
    num_sequences: int = DEFAULT_NUM_SEQUENCES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    prompt: str = "bos",
    accumulator: StatsAccumulator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_sequences`` sequences of ``seq_len`` tokens (prompt included) from ``model``.

    Returns ``(ids [N, seq_len] int64, mask [N, seq_len] bool)``, mask False from the first EOS on
    (positions after it hold the pad id).  With ``accumulator``, each forward's FFN statistics are
    accumulated into it (mask applied).  See the module docstring for the sampling rule.
    """
    from tqdm.auto import tqdm

    _check_positive_int("num_sequences", num_sequences)
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("batch_size", batch_size)
    prompt_ids = _nps_prompt(tokenizer, prompt)
    P = len(prompt_ids)
    if P > seq_len:
        raise ValueError(f"seq_len={seq_len} is shorter than the {P}-token {prompt!r} prompt")
    eos = _eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    device = _model_device(model)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)

    all_ids = torch.full((num_sequences, seq_len), int(pad), dtype=torch.long)
    all_mask = torch.zeros((num_sequences, seq_len), dtype=torch.bool)
    bar = tqdm(total=num_sequences * seq_len, unit="tok", desc="calibrate (nps)", disable=not progress,
               leave=False, dynamic_ncols=True)
    try:
        for start in range(0, num_sequences, batch_size):
            B = min(batch_size, num_sequences - start)
            gens = [_sequence_generator(seed, start + j, device) for j in range(B)]
            ids = torch.tensor([prompt_ids] * B, dtype=torch.long, device=device)
            alive = torch.ones(B, dtype=torch.bool, device=device)
            out_ids = [ids]
            out_mask = [alive.unsqueeze(1).expand(B, P)]
            cache = None
            step_in = ids
            fed = 0
            while True:
                if accumulator is not None:
                    accumulator.mask = alive.unsqueeze(1).expand_as(step_in).contiguous()
                    accumulator.count(int(alive.sum()) * step_in.shape[1])
                out = model(input_ids=step_in, **cache_kwargs(model, cache), use_cache=True)
                cache = output_cache(out)
                fed += step_in.shape[1]
                bar.update(B * step_in.shape[1])
                if fed >= seq_len:
                    break
                nxt = _sample(out.logits[:, -1, :], gens)
                # A sequence ends at its first EOS: the EOS itself is not fed/counted, later positions
                # are padding (still computed in the batch, masked out of the statistics).
                alive = alive & ~torch.isin(nxt, eos_t)
                nxt = torch.where(alive, nxt, torch.full_like(nxt, int(pad)))
                step_in = nxt.unsqueeze(1)
                out_ids.append(step_in)
                out_mask.append(alive.unsqueeze(1))
                if not bool(alive.any()):
                    bar.update(B * (seq_len - fed))
                    break
            ids_b = torch.cat(out_ids, dim=1).cpu()
            mask_b = torch.cat(out_mask, dim=1).cpu()
            all_ids[start:start + B, : ids_b.shape[1]] = ids_b
            all_mask[start:start + B, : mask_b.shape[1]] = mask_b
            del cache
    finally:
        bar.close()
        if accumulator is not None:
            accumulator.mask = None
    return all_ids, all_mask


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------

def _read_text_source(source) -> tuple[list[str], str]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(
                f"source must be 'nps', a list of strings or the path of a text file; {path!r} is not a file"
            )
        with open(path, encoding="utf-8") as f:
            return [f.read()], os.path.basename(path)
    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        docs = list(source)
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise TypeError(f"source[{i}] must be a str, got {type(d).__name__}")
        return docs, f"list of {len(docs)} strings"
    raise TypeError(f"source must be 'nps', a list of strings or a path, got {type(source).__name__}")


def text_chunks(tokenizer, docs: Sequence[str], seq_len: int, num_sequences: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``docs`` into ``[N, seq_len]`` ids + bool mask (see the module docstring's rule)."""
    _check_positive_int("seq_len", seq_len)
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    body = seq_len - 1 if bos is not None else seq_len
    if body < 1:
        raise ValueError(f"seq_len must be >= 2 to hold BOS + text, got {seq_len}")
    stream: list[int] = []
    for i, d in enumerate(docs):
        if not d.strip():
            continue
        if stream and eos is not None:
            stream.append(int(eos))
        stream.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
    if not stream:
        raise ValueError("source holds no text (all strings empty)")
    pieces = [stream[i:i + body] for i in range(0, len(stream), body)]
    if num_sequences is not None:
        pieces = pieces[:num_sequences]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    ids = torch.full((len(pieces), seq_len), int(pad), dtype=torch.long)
    mask = torch.zeros((len(pieces), seq_len), dtype=torch.bool)
    for r, p in enumerate(pieces):
        row = ([int(bos)] if bos is not None else []) + p
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = True
    return ids, mask


@torch.inference_mode()
def accumulate_stats(model, ids: torch.Tensor, mask: torch.Tensor, batch_size: int,
                     accumulator: StatsAccumulator, progress: bool = False, desc: str = "calibrate") -> None:
    """Dense forwards of ``model`` over right-padded ``ids`` [N, T], adding statistics (mask applied)."""
    from tqdm.auto import tqdm

    device = _model_device(model)
    N = ids.shape[0]
    with tqdm(total=int(mask.sum()), unit="tok", desc=desc, disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for start in range(0, N, batch_size):
            m = mask[start:start + batch_size]
            T = int(m.sum(1).max())  # right padding: drop the all-padding tail columns
            x = ids[start:start + batch_size, :T].to(device)
            m = m[:, :T].to(device)
            accumulator.mask = m
            accumulator.count(int(m.sum()))
            model(input_ids=x, attention_mask=m.long(), use_cache=False)
            bar.update(int(m.sum()))
    accumulator.mask = None


# --------------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------------

def calibrate(
    model: torch.nn.Module,
    tokenizer,
    source: str | os.PathLike | Sequence[str] = "nps",
    num_sequences: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    *,
    prompt: str = "bos",
) -> GlobalStats:
    """Compute the global statistics (activation and impact) of every FFN layer of ``model``.

    Args:
        model: a dense (unpatched) Hugging Face causal LM with supported FFNs.
        tokenizer: its tokenizer.
        source: ``"nps"`` (default: the model's own samples), a list of strings, or a text file path.
        num_sequences: sequences to generate / text pieces to use (default 64 for NPS, all for text).
        seq_len: tokens per sequence, prompt / BOS included (default 256).
        batch_size: sequences per forward batch (default 32).
        seed: sampling seed (NPS).
        progress: tqdm progress bar on stderr.
        prompt: NPS prompt, ``"bos"`` (default) or ``"chat"`` (empty chat prompt).

    Returns: a :class:`GlobalStats` with full metadata (model signature, source, sizes, seed,
    versions, token count, elapsed seconds).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("tokenizer is required (to find BOS/EOS and to tokenise text sources)")
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("batch_size", batch_size)
    if num_sequences is not None:
        _check_positive_int("num_sequences", num_sequences)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    acc = StatsAccumulator(model)
    meta: dict[str, Any] = dict(seq_len=seq_len, batch_size=batch_size,
                                model_dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    try:
        with acc:
            if isinstance(source, str) and source == "nps":
                n = DEFAULT_NUM_SEQUENCES if num_sequences is None else num_sequences
                generate_nps(model, tokenizer, n, seq_len, batch_size, seed, prompt, acc, progress)
                meta.update(source="nps", prompt=prompt, num_sequences=n, seed=seed,
                            sampling={"temperature": 1.0, "top_k": 0, "top_p": 1.0})
            else:
                docs, name = _read_text_source(source)
                ids, mask = text_chunks(tokenizer, docs, seq_len, num_sequences)
                accumulate_stats(model, ids, mask, batch_size, acc, progress, "calibrate (text)")
                meta.update(source="text", text=name, num_sequences=int(ids.shape[0]))
    finally:
        model.train(was_training)
    if acc.num_tokens == 0:
        raise ValueError("calibration saw no token (every sequence ended at once?); use more or longer text")
    meta["elapsed_s"] = round(time.perf_counter() - t0, 3)
    logger.info("calibrated %d FFN layers on %d tokens (%s) in %.1f s", len(acc.sites), acc.num_tokens,
                meta["source"], meta["elapsed_s"])
    return GlobalStats.for_model(model, acc.activation, acc.impact, num_tokens=acc.num_tokens, **meta)
