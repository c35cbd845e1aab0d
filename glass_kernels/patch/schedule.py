"""The GLASS schedule (docs/method.md, "When the neurons are chosen"): dense prompt + local statistics, then sparse decode.

The phase is read from what the patched model's forward really receives, through a forward
pre-hook (with kwargs) on the top-level model instance:

* cache empty / absent (no cache, or ``get_seq_length() == 0``): a new sequence. Where the cache
  argument is found, and under which name, depends on the transformers version: ``hf_compat``.
  The FFNs run dense and accumulate each sequence's local statistic (``ffn.accumulate_statistic``,
  padding excluded through the current tokens' columns of the 2-D attention mask).
* cache non-empty: before the first such forward, every sequence's neurons are selected
  (``ops.select_neurons``); from then on every forward (any number of tokens) runs
  ``sparse_ffn`` / ``sparse_mlp`` with them, until the next new sequence.
* ``with session(model).prompt():`` marks forwards as prompt chunks: they keep accumulating even
  with a non-empty cache (chunked prefill, or a further prompt turn after some decoding: the new
  tokens add to the statistics, and the sets are chosen again after them). ``generate()``'s own
  prefill (``GenerationMixin._prefill``, also with ``prefill_chunk_size`` or a cache passed in)
  runs inside it automatically.
* Without a KV cache (``use_cache=False``) every forward is a new sequence, so it runs dense.

Never silent: every forward is counted (``Session.counters()``: prompt forwards, forwards after the
prompt that ran the sparse kernel, forwards after the prompt that ran dense). Inside ``generate()``
every forward after the prompt is a decode step by construction; one that arrives without a
non-empty cache is counted as a dense decode step and warned about once (a transformers release
that passes the cache under a new name shows up here, not as a silent slowdown).

One patched model holds one sequence's state: a forward while another thread's forward is in flight,
or one that continues a sequence another thread started, raises RuntimeError instead of mixing them.

Rows of a batch whose inputs (ids or embeddings, and mask) are identical in every prompt chunk
share one neuron set: the beams / samples that ``generate()`` expands from one prompt get exactly
the same set, so reordering the cache between beams cannot mismatch sets and caches.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import Sequence

import torch
from torch import nn

from .. import hf_compat
from .config import GlassConfig
from .plan import DecodePlan
from ..ffn import FFNSite, accumulate_statistic, down_norms
from .selection import layer_k, make_selection

logger = logging.getLogger("glass_kernels.patch")


class _CallDepths(threading.local):
    """One thread's depths inside generate() / its prefill / session.prompt() (zero in a new thread)."""

    prompt = 0
    generate = 0
    forwards = 0


class GlassState:
    """Everything a patched model keeps between forwards (shared by all its GlassFFN modules): which
    phase the current sequence is in (from what each forward receives), its local statistics and
    row groups, and its neuron sets. Choosing the sets is ``selection`` (selection.py); the decode
    calls for them are a ``DecodePlan`` (plan.py).

    Memory: per layer, fp32 down_norms [D] (i-glass) and the selection's buffers (int32 global
    ranks [D]); per prompt, fp32 local statistics [B, D], int32 neuron sets [B, k] and, with
    strategy "compact", the copied rows. See ``memory_overhead()``.
    """

    _INPUT_NAMES = ("input_ids", "attention_mask", "inputs_embeds")

    def __init__(self, model: nn.Module, sites: list[FFNSite], config: GlassConfig, stats) -> None:
        self.config = config
        self.sites = sites
        self.n = len(sites)
        self.k = layer_k(config, [s.D for s in sites], [s.handler.row_elems for s in sites], stats)
        self.impact = config.local_kind == "impact"
        self.selection = make_selection(config, [s.D for s in sites], self.k, stats)
        # The down norms live with the weights (moved lazily if the model moves).
        self.down_norms: list[torch.Tensor] | None = None
        if self.impact:
            self.down_norms = [down_norms(s) for s in sites]
        params = list(inspect.signature(model.forward).parameters)
        self._pos = {n: params.index(n) for n in self._INPUT_NAMES if n in params}
        cache_name = hf_compat.cache_arg_name(model.forward)
        self._cache_pos = params.index(cache_name) if cache_name else None
        # Where the calling thread is (inside generate(), its prefill, session.prompt()): per thread,
        # so that a second thread entering generate() cannot turn this thread's decode step into a
        # prompt turn before the forward lock refuses it (see prompt_depth below).
        self._where = _CallDepths()
        self.counters = {"prompt": 0, "sparse": 0, "dense": 0}
        self._warned: set[str] = set()
        self._backend_tokens: list = []
        # One sequence's state per patched model: a forward pass in flight and the thread that
        # started the current sequence are recorded, so that use from a second thread raises
        # instead of mixing two sequences' neuron sets (see pre_hook).
        self._forward_lock = threading.Lock()
        self._forward_thread: int | None = None
        self._sequence_thread: int | None = None
        self.decode_tuning = None  # tuning.DecodeTuning, set by patch() (None: the core's own)
        self.prompt_copy = None  # tuning.PromptCopy, set by patch()
        self.quantized = None  # per layer quantized.QuantizedFFN (GlassConfig.weights), set by patch()
        self.reset()

    # The calling thread's depths (properties over a threading.local, read and written as ints).
    prompt_depth = property(lambda self: self._where.prompt,
                            lambda self, v: setattr(self._where, "prompt", v))
    """> 0 inside session.prompt() / generate()'s prefill, in this thread."""
    generate_depth = property(lambda self: self._where.generate,
                              lambda self, v: setattr(self._where, "generate", v))
    """> 0 inside model.generate(), in this thread."""
    generate_forwards = property(lambda self: self._where.forwards,
                                 lambda self, v: setattr(self._where, "forwards", v))
    """Forwards since this thread's current generate() started."""

    def warn_once(self, key: str, msg: str) -> None:
        """Log ``msg`` once per patched model (each problem is reported, but not at every step)."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg)

    # -- per-sequence state -----------------------------------------------------------------
    def reset(self) -> None:
        self.phase = "idle"  # "idle" | "prompt" | "decode"
        self.collect = False  # GlassFFN: accumulate local statistics in this forward
        self.sparse = False  # GlassFFN: run the sparse op in this forward
        self.batch = 0  # rows of the current forward
        self.seq_batch = 0  # rows of the current sequence(s)
        self.mask: torch.Tensor | None = None  # bool [B, T] of the current tokens, or None
        self.local: list[torch.Tensor | None] = [None] * self.n
        self.tokens: torch.Tensor | None = None  # int64 [B]: prompt tokens behind each row's statistics
        self.groups: torch.Tensor | None = None  # int64 [B]: rows with identical prompts
        self.neurons: list[torch.Tensor] | None = None  # int32 [B or 1, k] per layer
        self.forced = False
        self.plan: DecodePlan | None = None  # the decode calls for the current sets

    def start_sequence(self, batch: int) -> None:
        self.reset()
        self.phase = "prompt"
        self.seq_batch = batch
        self._sequence_thread = threading.get_ident()

    # -- the pre-hook -----------------------------------------------------------------------
    def _arg(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        i = self._pos.get(name)
        if i is not None and i < len(args):
            return args[i]
        return None

    def _find_cache(self, args: tuple, kwargs: dict):
        found, cache = hf_compat.find_cache(args, kwargs, self._cache_pos)
        if not found:
            stray = hf_compat.stray_cache(kwargs)
            if stray is not None:
                self.warn_once(
                    "stray-cache",
                    f"glass_kernels: the model's forward received its KV cache as {stray!r}, a name that "
                    f"glass_kernels.hf_compat.CACHE_ARG_NAMES does not list (transformers "
                    f"{hf_compat.transformers_version()}); using it. Please report this.",
                )
                return kwargs[stray]
        return cache

    def _decode_step_misread(self, cache, kwargs: dict) -> bool:
        """A forward inside generate(), after its prompt, that carries no non-empty cache: generate()
        is decoding, but this forward cannot be told apart from a new prompt, so it runs dense."""
        if not (self.generate_depth and self.prompt_depth == 0 and self.generate_forwards > 1):
            return False
        if cache is None and kwargs.get("use_cache") is False:
            reason = ("generate() runs without a KV cache (use_cache=False): every step re-reads the whole "
                      "sequence as a new prompt")
        else:
            reason = (f"the KV cache was not found in the forward's arguments (transformers "
                      f"{hf_compat.transformers_version()}; glass_kernels.hf_compat looks for "
                      f"{' / '.join(hf_compat.CACHE_ARG_NAMES)}). This is a bug: please report it")
        self.warn_once("dense-decode", f"glass_kernels: a decode step of generate() ran dense: {reason}.")
        return True

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        me = threading.get_ident()
        if not self._forward_lock.acquire(blocking=False):
            raise RuntimeError(
                "glass_kernels: this patched model is running a forward pass in another thread; a patched "
                "model holds one sequence's state and cannot be used from two threads at once (patch one "
                "model per thread)"
            )
        self._forward_thread = me
        try:
            self._classify(args, kwargs, me)
        except BaseException:
            self._release_forward()
            raise
        self._enter_backend()
        return None

    def _release_forward(self) -> None:
        if self._forward_thread == threading.get_ident():
            self._forward_thread = None
            self._forward_lock.release()

    def _classify(self, args: tuple, kwargs: dict, me: int) -> None:
        """Prompt or decode? Sets collect / sparse for this forward (module docstring)."""
        ids = self._arg("input_ids", args, kwargs)
        embeds = self._arg("inputs_embeds", args, kwargs)
        x = ids if ids is not None else embeds
        if x is None:
            raise ValueError("glass_kernels: the patched forward got neither input_ids nor inputs_embeds")
        B, T = int(x.shape[0]), int(x.shape[1])
        if self.generate_depth:
            self.generate_forwards += 1
        cache = self._find_cache(args, kwargs)
        cache_len = hf_compat.cache_length(cache)
        if cache_len > 0 and self._sequence_thread not in (None, me):
            raise RuntimeError(
                "glass_kernels: this forward continues a sequence that another thread started on the same "
                "patched model (two threads cannot share one patched model: patch one model per thread)"
            )
        if cache_len == 0 or self.prompt_depth > 0:
            if cache_len == 0:
                misread = self._decode_step_misread(cache, kwargs)
                self.counters["dense" if misread else "prompt"] += 1
                self.start_sequence(B)
            elif self.phase == "idle":
                # A prompt chunk on a cache filled before patching (or after reset()).
                self.counters["prompt"] += 1
                self.start_sequence(B)
            else:
                self.counters["prompt"] += 1
                self._check_batch(B)
                if self.phase == "decode":
                    # A further prompt turn: keep the statistics, choose again afterwards.
                    self.phase = "prompt"
                    self.neurons = None
                    self.forced = False
                    self.plan = None
            self.batch = B
            self.mask = self._token_mask(self._arg("attention_mask", args, kwargs), B, T)
            self._count_tokens(B, T)
            self._update_groups(ids, embeds, self.mask)
            self.collect = True
            self.sparse = False
        else:
            if self.phase != "decode":
                self.select()
            self._check_batch(B)
            self.batch = B
            self.collect = False
            self.sparse = self.plan is not None
            self.counters["sparse" if self.sparse else "dense"] += 1

    def post_hook(self, module, args, kwargs, output):
        if self._forward_thread == threading.get_ident():  # not when our own pre_hook refused the call
            self._exit_backend()
            self._release_forward()
        return None

    def _enter_backend(self) -> None:
        if self.config.backend != "auto":
            from .. import backend as _backend  # the ops' contextvar

            self._backend_tokens.append(_backend.set(self.config.backend))

    def _exit_backend(self) -> None:
        if self._backend_tokens:
            from .. import backend as _backend

            _backend.reset(self._backend_tokens.pop())

    def _check_batch(self, B: int) -> None:
        if not self.seq_batch or B == self.seq_batch:
            return
        if self.neurons is not None and all(t.shape[0] == 1 for t in self.neurons):
            return  # one set shared by every row
        if self.phase == "decode" and B % self.seq_batch == 0:
            self._expand(B // self.seq_batch)
            return
        raise RuntimeError(
            f"glass_kernels: this forward has batch {B} but the current sequences have batch "
            f"{self.seq_batch}; expand inputs before the prompt (as generate() does), expand the "
            "cache by an integer factor (Cache.batch_repeat_interleave), or start a new sequence "
            "(empty cache)"
        )

    def _expand(self, r: int) -> None:
        """The cache was expanded after the prompt (``Cache.batch_repeat_interleave(r)``: row b
        becomes rows b*r .. b*r + r-1): expand the sets, statistics and groups the same way."""
        self.local = [None if t is None else t.repeat_interleave(r, dim=0) for t in self.local]
        if self.tokens is not None:
            self.tokens = self.tokens.repeat_interleave(r, dim=0)
        if self.groups is not None:
            self.groups = self.groups.repeat_interleave(r, dim=0)
        if self.neurons is not None:
            self.neurons = [t.repeat_interleave(r, dim=0).contiguous() for t in self.neurons]
        self.seq_batch *= r
        self._prepare()

    def _token_mask(self, attention_mask, B: int, T: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if attention_mask.dim() == 2:
            if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(
                    f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the "
                    f"{B} x {T} input tokens"
                )
            # The 2-D mask covers cache + current tokens; the current tokens are its last T columns.
            m = attention_mask[:, -T:] != 0
            return m.contiguous()
        self.warn_once(
            "mask4d",
            "glass_kernels: a 4-D attention mask (compiled/static cache) cannot tell padding apart; "
            "every prompt token counts in the local statistics. Use a 2-D mask with padded batches.",
        )
        return None

    def _count_tokens(self, B: int, T: int) -> None:
        counted = self.mask.sum(1).cpu().long() if self.mask is not None else torch.full((B,), T, dtype=torch.long)
        if self.tokens is None or self.tokens.numel() != B:
            self.tokens = torch.zeros(B, dtype=torch.long)
        self.tokens += counted

    def _update_groups(self, ids, embeds, mask) -> None:
        B = self.batch
        if B == 1:
            self.groups = torch.zeros(1, dtype=torch.long)
            return
        key = ids.reshape(B, -1) if ids is not None else embeds.detach().reshape(B, -1)
        if mask is not None:
            key = torch.cat([key, mask.to(key.dtype)], dim=1)
        cur = torch.unique(key, dim=0, return_inverse=True)[1].cpu()
        if self.groups is not None and self.groups.numel() == B:
            cur = torch.unique(torch.stack([self.groups, cur], 1), dim=0, return_inverse=True)[1]
        self.groups = cur

    # -- statistics ---------------------------------------------------------------------------
    def accumulate(self, layer: int, h: torch.Tensor) -> None:
        out = self.local[layer]
        if out is None:
            out = self.local[layer] = torch.zeros(self.batch, h.shape[-1], dtype=torch.float32, device=h.device)
        norms = None
        if self.impact:
            norms = self.down_norms[layer]
            if norms.device != h.device:
                norms = self.down_norms[layer] = norms.to(h.device)  # moved once, kept with the weights
        accumulate_statistic(h, out, batch=self.batch, mask=self.mask, norms=norms)

    # -- selection ----------------------------------------------------------------------------
    def select(self) -> None:
        """Fix each sequence's neurons (once per prompt) and prepare the decode calls."""
        if not self.forced:
            local = None
            if self.selection.needs_local:
                if self.phase == "idle" or any(t is None for t in self.local):
                    raise RuntimeError(
                        f"glass_kernels: method {self.config.method!r} needs the prompt's statistics, but no "
                        "prompt went through the patched model for the current sequence (its KV cache was "
                        "filled elsewhere). Run the prompt through the patched model, or force the sets with "
                        "glass_kernels.session(model).set_neurons(...)."
                    )
                local = self.local
            reps = self._group_representatives()
            tokens = self.tokens
            if reps is not None:  # rows expanded from one prompt share the set of its first row
                local = [t.index_select(0, reps.to(t.device)) for t in local]
                tokens = None if tokens is None else tokens.index_select(0, reps)
            sets = self.selection.choose(local, self._device, tokens)
            if sets is not None and reps is not None:
                sets = [t.index_select(0, self.groups.to(t.device)).contiguous() for t in sets]
            self.neurons = sets
        self.phase = "decode"
        self._prepare()

    def _group_representatives(self) -> torch.Tensor | None:
        """The first row of each group of identical prompts, when some rows share a group."""
        groups = self.groups
        if not self.selection.needs_local or groups is None or groups.numel() <= 1:
            return None
        G = int(groups.max()) + 1
        if G == groups.numel():
            return None
        first = torch.full((G,), groups.numel(), dtype=torch.long)
        first.scatter_reduce_(0, groups, torch.arange(groups.numel()), reduce="amin")
        return first

    def _device(self, layer: int) -> torch.device:
        return self.sites[layer].handler.in_weight(self.sites[layer].module).device

    def _prepare(self) -> None:
        """The decode plan for the current sets (None: dense decoding)."""
        if self.neurons is None:
            self.plan = None
            return
        if self.decode_tuning is not None and self.decode_tuning.gbps is not None:  # measured or cached
            from .. import tuning

            tuning.apply(self.decode_tuning)  # per sequence, in case another patched model changed it
        quantized = self.quantized
        self.plan = DecodePlan(self.sites, self.neurons, quantized is None and self._use_compact(), quantized)

    def _use_compact(self) -> bool:
        """Whether this prompt's sets are read from a compacted copy (GlassConfig.strategy)."""
        strategy = self.config.strategy
        if strategy == "gather":
            return False
        shared = all(t.shape[0] == 1 for t in self.neurons)
        if not shared:
            if strategy == "compact":
                self.warn_once("compact-per-seq", "glass_kernels: strategy=\"compact\" needs one neuron set "
                               "for all rows; these sequences have their own sets, so they are read in place")
            return False
        if strategy == "compact":
            return True
        t = self.decode_tuning
        return bool(t is not None and t.compact_faster)

    def sparse_forward(self, layer: int, x: torch.Tensor, flattens: bool) -> torch.Tensor:
        return self.plan.forward(layer, x, self.batch, flattens)

    # -- explicit sets --------------------------------------------------------------------------
    def choose(self, local: Sequence[torch.Tensor], tokens: torch.Tensor) -> list[torch.Tensor] | None:
        """The sets this patch chooses for per-layer statistics [R, D] of prompts of ``tokens`` tokens."""
        return self.selection.choose([t.float().contiguous() for t in local], self._device,
                                     torch.as_tensor(tokens).long().cpu())

    def set_neurons(self, sets: Sequence[torch.Tensor]) -> None:
        if len(sets) != self.n:
            raise ValueError(f"sets must have one tensor per FFN layer ({self.n}), got {len(sets)}")
        out = []
        for l, s in enumerate(sets):
            if not isinstance(s, torch.Tensor) or s.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"sets[{l}] must be an int32/int64 tensor [B, k] or [k]")
            if s.dim() == 1:
                s = s.unsqueeze(0)
            if s.dim() != 2 or s.shape[1] < 1:
                raise ValueError(f"sets[{l}] must have shape [B, k] or [k] with k >= 1, got {tuple(s.shape)}")
            D = self.sites[l].D
            if s.numel() and (int(s.min()) < 0 or int(s.max()) >= D):
                raise IndexError(f"sets[{l}] has indices outside [0, {D})")
            if self.seq_batch and s.shape[0] not in (1, self.seq_batch):
                raise ValueError(
                    f"sets[{l}] has {s.shape[0]} rows but the current sequences have batch {self.seq_batch}"
                )
            out.append(s.to(device=self._device(l), dtype=torch.int32).contiguous())
        rows = {s.shape[0] for s in out} - {1}  # per-sequence row counts; 1 = shared by every row
        if len(rows) > 1:
            raise ValueError(f"sets have different row counts {sorted(rows)}: each must have 1 or B rows")
        self.neurons = out
        self.forced = True
        self._sequence_thread = None  # forced sets may be decoded from any thread
        if not self.seq_batch:
            # the batch is the per-sequence sets' row count, whichever layer has them (any set may be shared)
            self.seq_batch = rows.pop() if rows else 1
        self.phase = "decode"
        self._prepare()

    def memory_overhead(self) -> dict[str, int]:
        """Bytes held by the patch layer now: per-layer buffers and per-sequence state."""
        def nbytes(ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        out = {"global_ranks": 0, "fixed_sets": 0, **self.selection.nbytes(),
               "down_norms": nbytes(self.down_norms or []),
               "local_stats": nbytes(self.local),
               "neuron_sets": nbytes(self.neurons or []),
               "compact_copies": self.plan.copy_nbytes() if self.plan is not None else 0}
        out["total"] = sum(out.values())
        # GlassConfig.weights: the quantized rows stand in for the FFN's released float weights
        # (storage that replaced larger storage, so not part of the total overhead)
        out["quantized_rows"] = sum(q.nbytes for q in self.quantized or [])
        return out


def kernel_layers_note(layers: tuple[int, int] | None) -> str:
    """" (the kernel in K of L layers; ...)" where a selection of (K, L) = Session.kernel_layers()
    keeps some layers whole, " (every layer keeps all its neurons: ...)" where it keeps all, else ""."""
    if layers is None or layers[0] == layers[1]:
        return ""
    if layers[0] == 0:
        return " (every layer keeps all its neurons: each ran its dense forward)"
    return f" (the kernel in {layers[0]} of {layers[1]} layers; the others keep all their neurons)"


class Session:
    """Handle on a patched model's schedule: ``glass_kernels.session(model)``.

    ``prompt()``: context manager; forwards inside it are prompt chunks (dense, accumulate the
    local statistics) even with a non-empty cache. ``reset()``: forget the current sequence.
    ``local_stats()``: per layer fp32 [B, D], the accumulated sum over prompt tokens of
    (h_i / ||h||)^2 (times ||W_down[:, i]||^2 for i-glass) -- the square of docs/method.md's L_i.
    ``neurons()``: per layer int32 [B, k] (selecting now if the prompt is complete but no decode
    forward has run yet). ``set_neurons(sets)``: force explicit per-layer sets ([B, k] or [k]) for
    the current sequence; the next new sequence (empty cache) starts over. ``phase``: "idle",
    "prompt" or "decode".
    """

    def __init__(self, state: GlassState) -> None:
        self._state = state

    @property
    def phase(self) -> str:
        return self._state.phase

    @property
    def config(self) -> GlassConfig:
        return self._state.config

    @property
    def k(self) -> list[int]:
        return list(self._state.k)

    @contextlib.contextmanager
    def prompt(self):
        st = self._state
        st.prompt_depth += 1
        try:
            yield self
        finally:
            st.prompt_depth -= 1

    def reset(self) -> None:
        self._state.reset()

    def local_stats(self) -> list[torch.Tensor]:
        st = self._state
        if st.phase == "idle" or any(t is None for t in st.local):
            raise RuntimeError("no prompt has gone through the patched model yet")
        return [t.clone() for t in st.local]

    def neurons(self) -> list[torch.Tensor]:
        st = self._state
        if st.phase == "prompt":
            st.select()
        if st.neurons is None:
            raise RuntimeError(
                "no neuron sets: " + ("method 'dense' selects none" if st.config.method == "dense"
                                      else "no prompt has gone through the patched model yet")
            )
        return [t.clone() for t in st.neurons]

    def choose(self, local_stats: Sequence[torch.Tensor], tokens) -> list[torch.Tensor] | None:
        """The neuron sets this patch would choose for prompts with these local statistics (per layer
        fp32 [R, D], as ``local_stats()`` returns) and ``tokens`` prompt tokens per row ([R]), without
        running a prompt; None for "dense". Used to score many configurations on one prompt pass."""
        return self._state.choose(local_stats, tokens)

    def set_neurons(self, sets: Sequence[torch.Tensor]) -> None:
        self._state.set_neurons(sets)

    def memory_overhead(self) -> dict[str, int]:
        return self._state.memory_overhead()

    @property
    def strategy(self) -> str | None:
        """How the current sets are read: "gather" (in place) or "compact" (a per-prompt copy)."""
        return self._state.plan.strategy if self._state.plan is not None else None

    @property
    def layout(self) -> str:
        """The FFN weights' layout while patched: "separate" or "bundled" (GlassConfig.layout)."""
        t = self._state.decode_tuning
        return t.layout if t is not None else "separate"

    @property
    def prompt_copy(self):
        """Whether the prompt's dense forward copies the relaid weights to contiguous (a
        tuning.PromptCopy: ``.copy``, ``.source``, the measured times)."""
        return self._state.prompt_copy

    @property
    def decode_tuning(self):
        """The decode kernel's setting for this model (``glass_kernels.tuning.DecodeTuning``)."""
        return self._state.decode_tuning

    def counters(self) -> dict[str, int]:
        """Forwards since ``patch`` (or ``reset_counters``), by how they ran.

        ``prompt``: dense, collecting the local statistics. ``sparse``: after the prompt, through
        the sparse kernel. ``dense``: after the prompt but dense -- expected with method "dense"
        only; otherwise a warning says why (e.g. generate(use_cache=False)).
        """
        return dict(self._state.counters)

    def reset_counters(self) -> None:
        for key in self._state.counters:
            self._state.counters[key] = 0

    def kernel_layers(self) -> tuple[int, int] | None:
        """(layers whose decode forward runs the sparse kernel, layers) for the current selection;
        None before a selection. A layer that keeps every neuron (keep 1.0, or a fitted per-layer
        keep of 1.0) runs its own dense forward instead: a "sparse" decode step counts such layers."""
        plan = self._state.plan
        if plan is None:
            return None
        n = len(plan.calls)
        return sum(not plan.runs_dense(layer) for layer in range(n)), n

    def decode_summary(self, since: dict[str, int] | None = None) -> str:
        """"N of M decode steps ran sparse" over the forwards after the prompt (since ``since``), and,
        where some layers keep every neuron, in how many layers the kernel ran."""
        now = self._state.counters
        base = since or {}
        sparse = now["sparse"] - base.get("sparse", 0)
        total = sparse + now["dense"] - base.get("dense", 0)
        return f"{sparse} of {total} decode steps ran sparse{kernel_layers_note(self.kernel_layers())}"
