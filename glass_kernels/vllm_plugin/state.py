"""Per-request GLASS inside one vLLM model runner: statistics while a prompt is prefilled, a neuron
set per layer when it starts decoding, freed when it finishes or is preempted.

vLLM flattens a step's tokens: request i of the persistent batch owns rows [off_i, off_i + n_i) of
every layer's input, at positions [c_i, c_i + n_i) of its sequence (c_i = tokens already computed).
A row at a position below the request's prompt length is a prompt token: it runs dense and adds to
that request's statistic (chunked prefill simply adds over several steps). Any later position is a
generated token: it runs the sparse kernel with the request's own set. A request whose sequence
starts again at position 0 (a new request, or one recomputed after preemption) starts a new
statistic, so its set is rebuilt from the same prompt.

The generated rows of one step run together: over the union of their requests' sets (each row
subtracting its extras), or as one masked dense FFN from ``masked_from_rows`` rows on, or with one
shared set (batch_sets="shared"). Under tensor parallelism each rank holds a contiguous range of
every FFN's neurons; ``TensorParallel`` carries the collectives that make its choice the one-rank
choice (or, per_shard, its own share).

This module knows nothing of vLLM's classes: ``hooks`` feeds it ``StepEntry`` rows and calls
``ServingState.forward`` from each patched MLP.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Callable, NamedTuple, Sequence

import torch

from .. import ops
from ..backend import _current as _backend_var
from ..patch.selection import Selection
from ..tuning import interleaved_median_s

FINISHED_KEPT = 256  # record_sets: how many finished requests' sets are kept
_serial = itertools.count()


@dataclasses.dataclass
class ServedFFN:
    """One gated FFN as the plugin serves it: views of vLLM's own weights, no copy.

    ``dense(x, mask=None)`` returns (h, y): the intermediate act(gate) * up (times ``mask`` [N, D]
    if given) and the output, through vLLM's own modules (so prompt tokens get vLLM's arithmetic);
    gate/up/down_t are the [D, d] rows the sparse kernel reads."""

    index: int
    name: str
    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    activation: str
    dense: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    down_norms: torch.Tensor | None = None  # i-glass: ||W_down[:, i]||
    offset: int = 0  # tensor parallel: this rank's first neuron (the rank holds offset .. offset + D - 1)
    D_full: int | None = None  # tensor parallel: the layer's neurons over all ranks

    @property
    def D(self) -> int:
        """Neurons on this rank."""
        return int(self.gate.shape[0])

    @property
    def d(self) -> int:
        return int(self.gate.shape[1])


class TensorParallel(NamedTuple):
    """The collectives of a tensor-parallel group (every rank calls them in the same order)."""

    all_gather: Callable[[torch.Tensor], torch.Tensor]  # concatenates the ranks' last dims, rank order
    all_reduce: Callable[[torch.Tensor], torch.Tensor]  # sums over the ranks


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
                 record_sets: bool, batch_sets: str = "per-request", tp: TensorParallel | None = None,
                 per_shard: bool = False) -> None:
        self.ffns = list(ffns)
        self.tp = tp
        # tensor parallel: "selection" ranks this rank's neurons only (k = its share) instead of all
        self.per_shard = per_shard and tp is not None
        self.k = list(k)
        self.selection = selection
        self.backend = backend
        self.record_sets = record_sets
        self.shared = batch_sets == "shared"
        self.rows_read = [0] * len(self.ffns)  # per layer: distinct rows of the latest sparse batch
        # per-request sets: decoding rows from which one masked dense FFN runs instead of the kernel
        # (measure_masked_crossover; None: where R x k exceeds the layer's neurons)
        self.masked_from_rows: int | None = None
        self.requests: dict[str, RequestState] = {}
        self.finished: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.plan: StepPlan | None = None
        self._stacked: dict[int, tuple[tuple, object]] = {}  # per layer: (batch make-up, its run or mask)
        self.counters = collections.Counter()

    # -- request lifecycle -----------------------------------------------------------------------

    def release(self, request_ids, finished: bool) -> None:
        """Forget requests that finished (or were preempted: ``finished=False``; they restart at 0)."""
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if finished and self.record_sets:
                self.finished[rid] = {"prompt_tokens": req.prompt_tokens, "sets": self._global_ids(req.sets)}
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
        if plan.sparse_rows is not None and pos == 0:
            self.counters["decode_steps"] += 1
        if plan.sparse_rows is not None and self._masked_dense(pos, plan):
            # Per-request sets, many rows (masked_from_rows): their union nears every neuron, so run
            # the dense FFN once for all rows and zero each row's unselected neurons. The same result
            # as the kernel (up to summation order), at the dense cost.
            xs = x.index_select(0, plan.sparse_rows)
            y.index_copy_(0, plan.sparse_rows, ffn.dense(xs, self._mask(ffn, pos, plan))[1])
        elif plan.sparse_rows is not None:
            run = self._sets(ffn, pos, plan)
            xs = x.index_select(0, plan.sparse_rows).unsqueeze(1)  # [R, 1, d]: one row per set
            token = _backend_var.set(self.backend) if self.backend != "auto" else None
            try:
                ys = run(xs)
            finally:
                if token is not None:
                    _backend_var.reset(token)
            if self.tp is not None:
                ys = self.tp.all_reduce(ys)  # each rank summed its own neurons (as down_proj would)
            y.index_copy_(0, plan.sparse_rows, ys.squeeze(1))
        if plan.sparse_rows is not None:
            self.counters["ffn_bytes_read"] += self.rows_read[pos] * 3 * ffn.d * ffn.gate.element_size()
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
            if self.tp is None:
                ops.neuron_stats(h[lo:hi].unsqueeze(0), down_norms=ffn.down_norms, out=out)
            else:
                out += self._sharded_stat(h[lo:hi], ffn.down_norms)

    def _sharded_stat(self, h: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        """ops.neuron_stats of a rank's shard of h [T, D/tp]: each token normalised by its norm over
        all ranks' neurons (one all-reduce of T squared norms), so the ranks' statistics together
        are the unsharded statistic."""
        v = h.float() if norms is None else h.float() * norms
        sq = v * v
        total = self.tp.all_reduce(sq.sum(-1))
        inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
        return (sq * inv.unsqueeze(-1)).sum(0, keepdim=True)

    def _masked_dense(self, pos: int, plan: StepPlan) -> bool:
        """Whether this step's per-request sets run as one masked dense FFN (see masked_from_rows)."""
        if self.shared:
            return False
        if self.masked_from_rows is not None:
            return len(plan.sparse_requests) >= self.masked_from_rows
        ffn = self.ffns[pos]  # unmeasured: where R rows x k would read more rows than the layer has
        ranked = ffn.D if self.per_shard else (ffn.D_full or ffn.D)  # the neurons k is a share of
        return len(plan.sparse_requests) * self.k[pos] > ranked

    def measure_masked_crossover(self, rows=(2, 3, 4, 6, 8, 12, 16, 24, 32), reps: int = 3) -> int | None:
        """From how many decoding rows one masked dense FFN beats the kernel over per-request sets
        (None if it never does up to max(rows)), timed as a decode step runs them: every layer in
        turn, so the weights come from memory as in serving (each time the median of ``reps``
        passes). The kernel reads the sets' union (and each row's extras) or R x k rows, the dense
        FFN every row once at GEMM speed: where they cross depends on the machine and on how much
        the sets overlap, so it is measured, on sets this selection makes from random prompt
        statistics (a-/i-glass sets still share the global prior's neurons, as real ones do). The
        kernel and dense passes alternate, after one warm-up round of each (tuning.interleaved_median_s)."""
        g = torch.Generator().manual_seed(0)
        for R in rows:
            runs, masked = [], []
            for pos, ffn in enumerate(self.ffns):
                x = torch.randn(R, 1, ffn.d, generator=g).to(ffn.gate.dtype)
                sets = [self._choose(pos, torch.rand(1, ffn.D, generator=g), 32).reshape(-1) for _ in range(R)]
                run, _ = self._sparse_run(ffn, sets)
                mask = _mask_of(sets, ffn.D, ffn.gate.dtype)
                runs.append(functools.partial(run, x))
                masked.append(functools.partial(ffn.dense, x.squeeze(1), mask))
            kernel, dense = interleaved_median_s([lambda: [f() for f in runs], lambda: [f() for f in masked]], reps)
            if dense < kernel:
                return R
        return None

    def _mask(self, ffn: ServedFFN, pos: int, plan: StepPlan) -> torch.Tensor:
        """[R, D] 0/1 of each sparse row's request set (cached per batch make-up, as the sets)."""
        def build():
            sets = [self._request_set(pos, req) for req in plan.sparse_requests]
            return _mask_of(sets, ffn.D, ffn.gate.dtype).to(ffn.gate.device), ffn.D
        return self._per_batch(pos, ("mask",) + plan.sparse_key, build)

    def _sets(self, ffn: ServedFFN, pos: int, plan: StepPlan) -> Callable[[torch.Tensor], torch.Tensor]:
        """How this step's sparse rows xs [R, 1, d] run, decided and validated once per batch make-up:

        * one set for all rows (shared, or a single request): one kernel call;
        * per-request sets that overlap (the usual case: the global prior pulls every request's set
          toward the same neurons): the union U of the sets is read once for all rows as R tokens,
          then each row subtracts its neurons outside its own set (U minus S_r, few, still in cache);
        * otherwise one call with the stacked [R, k] sets, or (tensor parallel, where the rows keep
          different counts on this rank) one call per row."""
        def build():
            if self.shared:
                sets = [self._shared_set(pos, plan.sparse_requests).reshape(-1)]
            else:
                sets = [self._request_set(pos, req).reshape(-1) for req in plan.sparse_requests]
            return self._sparse_run(ffn, sets)
        return self._per_batch(pos, plan.sparse_key, build)

    def _per_batch(self, pos: int, key: tuple, build: Callable[[], tuple[object, int]]):
        """Layer ``pos``'s value for this batch make-up (``key``): built once, kept until the make-up
        changes; ``build`` returns (value, distinct weight rows a step reads with it)."""
        cached = self._stacked.get(pos)
        if cached is not None and cached[0] == key:
            return cached[1]
        value, self.rows_read[pos] = build()
        self._stacked[pos] = (key, value)
        return value

    def _sparse_run(self, ffn: ServedFFN, sets: list[torch.Tensor]) -> tuple[Callable, int]:
        """(run(xs [R, 1, d]) -> [R, 1, d], distinct rows read) for one set per row, or one for all."""
        def valid(idx):
            return ops.validate_sparse_ffn_operands(ffn.gate, ffn.up, ffn.down_t, idx.to(ffn.gate.device),
                                                    ffn.activation)

        def kernel(xs, idx):
            return ops.sparse_ffn_prevalidated(xs, ffn.gate, ffn.up, ffn.down_t, idx, ffn.activation)

        union = torch.cat(sets).unique()  # sorted: the distinct rows a step reads, whichever way it runs
        extras = [union[~torch.isin(union, s)] for s in sets]
        if len(sets) == 1 or (not self.shared and union.numel() + sum(e.numel() for e in extras)
                              < sum(s.numel() for s in sets)):
            u = valid(union)
            minus = [None if e.numel() == 0 else valid(e) for e in extras]

            def run(xs):
                y = kernel(xs.transpose(0, 1).contiguous(), u).transpose(0, 1)  # the R rows as R tokens
                for r, e in enumerate(minus):
                    if e is not None:
                        y[r] -= kernel(xs[r], e)
                return y
        elif len({s.numel() for s in sets}) == 1:
            stacked = valid(torch.stack(sets))
            run = functools.partial(kernel, idx=stacked)
        else:
            each = [valid(s) for s in sets]

            def run(xs):
                return torch.cat([kernel(xs[i:i + 1], e) for i, e in enumerate(each)])
        return run, union.numel()

    def _choose(self, pos: int, stat: torch.Tensor, tokens: int) -> torch.Tensor:
        """[1, k_rank]: the set chosen from a statistic [1, D] of this rank's neurons, as local indices.
        Tensor parallel: the ranks' statistics are gathered so that every rank ranks all D neurons
        exactly as one rank would, and each keeps the chosen neurons it holds (per_shard: each rank
        ranks its own neurons and keeps its share of k)."""
        gather = self.tp is not None and not self.per_shard
        if gather:
            stat = self.tp.all_gather(stat)
        chosen = self.selection.choose_layer(pos, stat, torch.tensor([tokens])).reshape(1, -1)
        if not gather:  # one rank, or per-shard: the selection ranked this rank's neurons only
            return chosen
        ffn = self.ffns[pos]
        mine = chosen[(chosen >= ffn.offset) & (chosen < ffn.offset + ffn.D)]
        return (mine - ffn.offset).to(torch.int32).reshape(1, -1).contiguous()

    def _request_set(self, pos: int, req: RequestState) -> torch.Tensor:
        s = req.sets[pos]
        if s is None:
            s = req.sets[pos] = self._choose(pos, req.stats[pos], req.prompt_tokens)
        return s

    def _shared_set(self, pos: int, requests: Sequence[RequestState]) -> torch.Tensor:
        """[1, k]: one set for every row, from the batch's pooled statistics (batch_sets="shared")."""
        unique = list({r.serial: r for r in requests}.values())
        if len(unique) == 1:
            return self._request_set(pos, unique[0])
        pooled = pool_statistics([r.stats[pos] for r in unique], [r.prompt_tokens for r in unique])
        return self._choose(pos, pooled, sum(r.prompt_tokens for r in unique))

    def request_sets(self) -> dict[str, list[torch.Tensor | None]]:
        """Request id -> its per-layer sets [1, k] of neuron ids (None: not chosen yet; tensor parallel:
        the ids this rank holds), for the live requests and
        (record_sets) the recently finished ones. vLLM reports a finished request at its next step,
        so the last requests of a burst stay live until then."""
        out = {rid: v["sets"] for rid, v in self.finished.items()}
        out.update({rid: self._global_ids(r.sets) for rid, r in self.requests.items()})
        return out

    def _global_ids(self, sets) -> list[torch.Tensor | None]:
        """A request's sets as neuron ids of the whole layer (tensor parallel: this rank's part)."""
        return [None if s is None else s.cpu() + f.offset for s, f in zip(sets, self.ffns)]

    def summary(self) -> dict:
        """What the plugin serves and has done (for tests, logs and ``glass_state``)."""
        return {
            "layers": len(self.ffns),
            "D": [f.D for f in self.ffns],
            "k": list(self.k),
            "live_requests": len(self.requests),
            "batch_sets": "shared" if self.shared else "per-request",
            "masked_from_rows": self.masked_from_rows,
            "rows_read": list(self.rows_read),
            "counters": dict(self.counters),
        }


def pool_statistics(stats: Sequence[torch.Tensor], prompt_tokens: Sequence[int]) -> torch.Tensor:
    """batch_sets="shared": the requests' statistics [1, D] pooled into one, each divided by its
    prompt tokens so that every request weighs alike."""
    return sum(s / n for s, n in zip(stats, prompt_tokens))


def shard_ranks(global_ranks: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """tp_selection="per-shard": the global ranks of neurons lo .. hi-1 re-ranked within the shard
    (same order, 1 .. hi - lo), int32."""
    return (global_ranks[lo:hi].argsort().argsort() + 1).to(torch.int32).contiguous()


def _mask_of(sets: Sequence[torch.Tensor], D: int, dtype) -> torch.Tensor:
    """[R, D] 1 where row r's set has the neuron, else 0 (the masked dense FFN's mask)."""
    mask = torch.zeros(len(sets), D, dtype=dtype)
    for r, s in enumerate(sets):
        mask[r, s.reshape(-1).long()] = 1.0
    return mask


def _rows(ranges: list[tuple[int, int]], device) -> torch.Tensor | None:
    if not ranges:
        return None
    return torch.cat([torch.arange(lo, hi, dtype=torch.int64) for lo, hi in ranges]).to(device)
