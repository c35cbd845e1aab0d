"""Per-request GLASS inside one vLLM model runner: statistics while a prompt is prefilled, a neuron
set per layer when it starts decoding, freed when it finishes or is preempted.

vLLM flattens a step's tokens: request i of the persistent batch owns rows [off_i, off_i + n_i) of
every layer's input, at positions [c_i, c_i + n_i) of its sequence (c_i = tokens already computed).
A row at a position below the request's prompt length is a prompt token: it runs dense and adds to
that request's statistic (chunked prefill simply adds over several steps). Any later position is a
generated token: it runs the sparse kernel with the request's own set. A request whose sequence
starts again at position 0 (a new request, or one recomputed after preemption) starts a new
statistic, so its set is rebuilt from the same prompt.

This module knows nothing of vLLM's classes: ``hooks`` feeds it ``StepEntry`` rows and calls
``ServingState.forward`` from each patched MLP.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Callable, NamedTuple, Sequence

import torch

from .. import ops
from ..backend import _current as _backend_var
from ..patch.selection import Selection

FINISHED_KEPT = 256  # record_sets: how many finished requests' sets are kept
_serial = itertools.count()


@dataclasses.dataclass
class ServedFFN:
    """One gated FFN as the plugin serves it: views of vLLM's own weights, no copy.

    ``dense(x)`` returns (h, y): the intermediate act(gate) * up and the output, through vLLM's own
    modules (so prompt tokens get vLLM's arithmetic); gate/up/down_t are the [D, d] rows the sparse
    kernel reads."""

    index: int
    name: str
    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    activation: str
    dense: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    down_norms: torch.Tensor | None = None  # i-glass: ||W_down[:, i]||

    @property
    def D(self) -> int:
        return int(self.gate.shape[0])

    @property
    def d(self) -> int:
        return int(self.gate.shape[1])


class StepEntry(NamedTuple):
    """One request of a step, in the step's row order."""

    request_id: str
    computed: int  # tokens of this request already in the KV cache (the first row's position)
    scheduled: int  # rows of this request in the step
    prompt_tokens: int


class RequestState:
    """A request's statistics [1, D] and sets [1, k] per layer (each made on first need)."""

    def __init__(self, request_id: str, prompt_tokens: int, layers: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.serial = next(_serial)  # identifies this life of the request (stacked-set cache key)
        self.stats: list[torch.Tensor | None] = [None] * layers
        self.sets: list[torch.Tensor | None] = [None] * layers
        self.prompt_seen = 0

    def stat(self, layer: int, D: int, device) -> torch.Tensor:
        s = self.stats[layer]
        if s is None:
            s = self.stats[layer] = torch.zeros(1, D, dtype=torch.float32, device=device)
        return s


@dataclasses.dataclass
class StepPlan:
    dense_rows: torch.Tensor | None  # int64 rows that run dense (prompt tokens, padding)
    stat_segments: list[tuple[RequestState, int, int]]  # (request, lo, hi) within the dense rows
    sparse_rows: torch.Tensor | None  # int64 rows that run sparse (generated tokens)
    sparse_requests: list[RequestState]  # the request of each sparse row
    total_rows: int

    @property
    def sparse_key(self) -> tuple[int, ...]:
        return tuple(r.serial for r in self.sparse_requests)


class ServingState:
    """Requests, step plan and the per-layer forward of one model runner."""

    def __init__(self, ffns: Sequence[ServedFFN], k: Sequence[int], selection: Selection, backend: str,
                 record_sets: bool) -> None:
        self.ffns = list(ffns)
        self.k = list(k)
        self.selection = selection
        self.backend = backend
        self.record_sets = record_sets
        self.requests: dict[str, RequestState] = {}
        self.finished: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.plan: StepPlan | None = None
        self._stacked: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        self.counters = collections.Counter()

    # -- request lifecycle -----------------------------------------------------------------------

    def release(self, request_ids, finished: bool) -> None:
        """Forget requests that finished (or were preempted: ``finished=False``; they restart at 0)."""
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if finished and self.record_sets:
                self.finished[rid] = {
                    "prompt_tokens": req.prompt_tokens,
                    "sets": [None if s is None else s.cpu() for s in req.sets],
                }
                while len(self.finished) > FINISHED_KEPT:
                    self.finished.popitem(last=False)
            self.counters["finished" if finished else "preempted"] += 1

    # -- one step ----------------------------------------------------------------------------------

    def begin_step(self, entries: Sequence[StepEntry], device) -> None:
        """Plan the rows of the next forward (``entries`` in the step's row order)."""
        dense: list[tuple[int, int]] = []
        segments: list[tuple[RequestState, int, int]] = []
        sparse: list[tuple[int, int]] = []
        sparse_requests: list[RequestState] = []
        dense_count, off = 0, 0
        for e in entries:
            req = self._request_at(e)
            n_prompt = max(0, min(e.scheduled, e.prompt_tokens - e.computed))
            if n_prompt:
                dense.append((off, off + n_prompt))
                segments.append((req, dense_count, dense_count + n_prompt))
                dense_count += n_prompt
                req.prompt_seen = e.computed + n_prompt
            if e.scheduled > n_prompt:
                if req.prompt_seen < req.prompt_tokens:
                    raise RuntimeError(f"glass_kernels: request {e.request_id!r} decodes after {req.prompt_seen} of "
                                       f"its {req.prompt_tokens} prompt tokens were seen")
                sparse.append((off + n_prompt, off + e.scheduled))
                sparse_requests.extend([req] * (e.scheduled - n_prompt))
            off += e.scheduled
        self.plan = StepPlan(_rows(dense, device), segments, _rows(sparse, device), sparse_requests, off)
        self.counters["prompt_rows"] += dense_count
        self.counters["sparse_rows"] += len(sparse_requests)

    def _request_at(self, e: StepEntry) -> RequestState:
        req = self.requests.get(e.request_id)
        if e.computed == 0 or req is None:
            if e.computed != 0:
                raise RuntimeError(
                    f"glass_kernels: request {e.request_id!r} starts at token {e.computed}, so its first tokens "
                    "never ran here and its statistics are incomplete (prefix caching or a KV transfer?)")
            if req is not None:  # starts over: recomputed after a preemption vLLM did not report
                self.counters["restarted"] += 1
            req = self.requests[e.request_id] = RequestState(e.request_id, e.prompt_tokens, len(self.ffns))
        return req

    def end_step(self) -> None:
        self.plan = None

    # -- the per-layer forward ---------------------------------------------------------------------

    def forward(self, pos: int, x: torch.Tensor) -> torch.Tensor:
        """The FFN of layer ``pos`` on the step's rows ``x`` [N, d]."""
        ffn, plan = self.ffns[pos], self.plan
        if plan is None or (plan.sparse_rows is None and not plan.stat_segments):
            return ffn.dense(x)[1]  # a warm-up / profiling run, or nothing to learn from
        if plan.sparse_rows is None and plan.total_rows == x.shape[0] and len(plan.stat_segments) == 1 \
                and plan.dense_rows.shape[0] == x.shape[0]:
            h, y = ffn.dense(x)  # one prompt chunk, every row: no gather, no scatter
            self._add_stats(ffn, pos, h, plan.stat_segments)
            return y
        y = torch.empty_like(x)
        dense_rows = self._dense_rows(plan, x.shape[0])
        if dense_rows is not None:
            h, yd = ffn.dense(x.index_select(0, dense_rows))
            self._add_stats(ffn, pos, h, plan.stat_segments)
            y.index_copy_(0, dense_rows, yd)
        if plan.sparse_rows is not None:
            idx = self._sets(ffn, pos, plan)
            xs = x.index_select(0, plan.sparse_rows).unsqueeze(1)  # [R, 1, d]: one row per set
            token = _backend_var.set(self.backend) if self.backend != "auto" else None
            try:
                ys = ops.sparse_ffn_prevalidated(xs, ffn.gate, ffn.up, ffn.down_t, idx, ffn.activation)
            finally:
                if token is not None:
                    _backend_var.reset(token)
            y.index_copy_(0, plan.sparse_rows, ys.squeeze(1))
        return y

    @staticmethod
    def _dense_rows(plan: StepPlan, rows: int) -> torch.Tensor | None:
        # padding rows past the scheduled tokens (if the runner pads) run dense; nobody reads them
        if rows == plan.total_rows:
            return plan.dense_rows
        pad = torch.arange(plan.total_rows, rows, dtype=torch.int64)
        return pad if plan.dense_rows is None else torch.cat([plan.dense_rows, pad])

    def _add_stats(self, ffn: ServedFFN, pos: int, h: torch.Tensor, segments) -> None:
        for req, lo, hi in segments:
            out = req.stat(pos, ffn.D, h.device)
            ops.neuron_stats(h[lo:hi].unsqueeze(0), down_norms=ffn.down_norms, out=out)

    def _sets(self, ffn: ServedFFN, pos: int, plan: StepPlan) -> torch.Tensor:
        """[R, k] int32: each sparse row's request set, stacked and validated once per batch make-up."""
        key = plan.sparse_key
        cached = self._stacked.get(pos)
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = []
        for req in plan.sparse_requests:
            s = req.sets[pos]
            if s is None:
                tokens = torch.tensor([req.prompt_tokens])
                s = req.sets[pos] = self.selection.choose_layer(pos, req.stats[pos], tokens).reshape(1, -1)
            rows.append(s)
        idx = torch.cat(rows).to(ffn.gate.device)
        idx = ops.validate_sparse_ffn_operands(ffn.gate, ffn.up, ffn.down_t, idx, ffn.activation)
        self._stacked[pos] = (key, idx)
        return idx

    def request_sets(self) -> dict[str, list[torch.Tensor | None]]:
        """Request id -> its per-layer sets [1, k] (None: not chosen yet), for the live requests and
        (record_sets) the recently finished ones. vLLM reports a finished request at its next step,
        so the last requests of a burst stay live until then."""
        out = {rid: v["sets"] for rid, v in self.finished.items()}
        out.update({rid: [None if s is None else s.cpu() for s in r.sets] for rid, r in self.requests.items()})
        return out

    def summary(self) -> dict:
        """What the plugin serves and has done (for tests, logs and ``glass_state``)."""
        return {
            "layers": len(self.ffns),
            "D": [f.D for f in self.ffns],
            "k": list(self.k),
            "live_requests": len(self.requests),
            "counters": dict(self.counters),
        }


def _rows(ranges: list[tuple[int, int]], device) -> torch.Tensor | None:
    if not ranges:
        return None
    return torch.cat([torch.arange(lo, hi, dtype=torch.int64) for lo, hi in ranges]).to(device)
