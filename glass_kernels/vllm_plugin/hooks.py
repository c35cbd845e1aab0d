"""The vLLM side of the plugin: where it hooks vLLM (tested against the installed vLLM by
tests/serving_vllm/test_plugin.py::test_hook_targets_exist, so a release that moves them fails loudly).

Hooks, all inert unless the engine's ``additional_config`` has a "glass" key (config.from_vllm):

* ``CPUModelRunner.load_model``: after vLLM loads the model, find its gated MLPs and serve them
  (``install``); while it loads, the MLP linears keep their plain weights (below).
* ``UnquantizedLinearMethod.process_weights_after_loading``: vLLM's CPU backend repacks every
  linear weight for oneDNN and frees the original. For the MLP's gate_up_proj / down_proj the
  plugin keeps the plain weight instead (down_proj's as a transposed view of a neuron-major
  W_down^T, made in place): the sparse kernel reads its rows and the dense prompt path multiplies
  with it, so the FFN weights stay in memory once.
* ``GPUModelRunner._update_states`` (inherited by the CPU runner): frees the sets of finished and
  preempted requests.
* ``GPUModelRunner._prepare_inputs``: tells the state which rows of the coming forward belong to
  which request, and whether they are prompt or generated tokens.
* ``GPUModelRunner.execute_model``: ends the step (warm-up and profiling runs see no plan: dense).
"""

from __future__ import annotations

import functools
import logging
import re

import torch

from . import config as plugin_config
from .state import ServedFFN, ServingState, StepEntry, TensorParallel, shard_ranks

# a child of vLLM's logger: its handlers print our lines the way they print vLLM's own
logger = logging.getLogger("vllm.plugins.glass_kernels")

_FFN_LINEAR = re.compile(r"(^|\.)mlp\.(gate_up_proj|down_proj)$")
_ATTR = "_glass_serving"  # the ServingState, on the runner and on its model
_loading: plugin_config.ServingConfig | None = None  # set while a runner loads a model with GLASS on
_installed = False


def targets():
    """(class, method name) of every vLLM function the plugin wraps."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return [(CPUModelRunner, "load_model"), (UnquantizedLinearMethod, "process_weights_after_loading"),
            (GPUModelRunner, "_update_states"), (GPUModelRunner, "_prepare_inputs"),
            (GPUModelRunner, "execute_model")]


def install_hooks() -> None:
    """Wrap vLLM's functions (idempotent: vLLM may call the plugin once per process, or more)."""
    global _installed
    if _installed:
        return
    wrappers = {"load_model": _load_model, "process_weights_after_loading": _process_weights,
                "_update_states": _update_states, "_prepare_inputs": _prepare_inputs,
                "execute_model": _execute_model}
    for cls, name in targets():
        original = cls.__dict__[name]
        if getattr(original, "__glass_original__", None) is not None:
            continue
        wrapped = functools.wraps(original)(functools.partial(wrappers[name], original))
        # functools.partial is not a descriptor: bind it like a method
        method = _as_method(wrapped)
        method.__glass_original__ = original
        setattr(cls, name, method)
    _installed = True


def _as_method(fn):
    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    functools.update_wrapper(method, fn)
    return method


# -- the wrappers ----------------------------------------------------------------------------------

def _load_model(original, runner, *args, **kwargs):
    global _loading
    cfg = plugin_config.from_vllm(runner.vllm_config)
    _loading = None if cfg is None or cfg.dense else cfg
    try:
        result = original(runner, *args, **kwargs)
    finally:
        _loading = None
    if cfg is not None and not cfg.dense:
        state = serve(runner.model, cfg, runner.vllm_config)
        setattr(runner, _ATTR, state)
    elif cfg is not None:
        logger.info("glass_kernels: keep %.2f / method %s is the dense model: vLLM runs unchanged",
                    cfg.glass.keep, cfg.glass.method)
    return result


def _process_weights(original, method, layer):
    if _loading is not None and _FFN_LINEAR.search(getattr(layer, "prefix", "") or ""):
        _keep_plain_weight(layer)
        return None
    return original(method, layer)


def _update_states(original, runner, scheduler_output):
    state = getattr(runner, _ATTR, None)
    if state is not None:
        state.release(scheduler_output.finished_req_ids, finished=True)
        state.release(getattr(scheduler_output, "preempted_req_ids", None) or (), finished=False)
    return original(runner, scheduler_output)


def _prepare_inputs(original, runner, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    state = getattr(runner, _ATTR, None)
    if state is not None:
        batch = runner.input_batch
        n = batch.num_reqs
        entries = [StepEntry(rid, int(batch.num_computed_tokens_cpu[i]), int(num_scheduled_tokens[i]),
                             int(runner.requests[rid].num_prompt_tokens))
                   for i, rid in enumerate(batch.req_ids[:n])]
        state.begin_step(entries, runner.device)
    return original(runner, scheduler_output, num_scheduled_tokens, *args, **kwargs)


def _execute_model(original, runner, *args, **kwargs):
    state = getattr(runner, _ATTR, None)
    try:
        return original(runner, *args, **kwargs)
    finally:
        if state is not None:
            state.end_step()


# -- weights ---------------------------------------------------------------------------------------

def _keep_plain_weight(layer) -> None:
    """Keep an MLP linear's weight as a plain tensor the sparse kernel can read (see module doc)."""
    w = layer.weight
    if w.dim() != 2 or w.is_meta:
        raise ValueError(f"glass_kernels: {layer.prefix} has a {tuple(w.shape)} weight; expected 2-D")
    if layer.prefix.endswith("down_proj"):
        from ..ffn.layout import make_neuron_major

        # [D, d] storage, neuron i's W_down column as one row; the parameter keeps its logical
        # [d, D] shape as a view of it (the HF patch's separate layout)
        make_neuron_major(w)
        layer.cpu_linear = _linear_on_transposed
    else:
        from ..ffn.layout import to_huge_pages

        to_huge_pages(w)  # the gathered rows' pages, as for W_down (same layout and values)
        layer.cpu_linear = torch.nn.functional.linear


def _linear_on_transposed(x, weight, bias):
    # weight is the [d, D] view of a contiguous [D, d]: x @ W^T = x @ down_t, a plain GEMM
    y = torch.matmul(x, weight.t())
    return y if bias is None else y + bias


def serve(model, cfg: plugin_config.ServingConfig, vllm_config) -> ServingState:
    """Serve ``model``'s gated MLPs with GLASS; returns the runner's ServingState."""
    from ..patch.selection import layer_k, make_selection
    from ..stats import GlobalStats, signature_of_ffn

    ffns = find_ffns(model)
    tp = _tensor_parallel()
    if tp is not None:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        for f in ffns:  # vLLM shards gate, up and W_down's columns alike: rank r holds one contiguous range
            f.offset, f.D_full = rank * f.D, size * f.D
    stats = None
    if cfg.stats_path is not None:
        stats = GlobalStats.load(cfg.stats_path)
        hf = vllm_config.model_config.hf_config
        downs = [f.down_t.t() if tp is None else tp.all_gather(f.down_t.t().contiguous()) for f in ffns]
        sig = signature_of_ffn(type(model).__name__, str(getattr(hf, "model_type", "") or ""), downs)
        del downs
        stats.check_model(model, _signature=sig)
        if cfg.glass.adaptive:
            stats.require_fit(f"lam={cfg.glass.lam!r}, keep_split={cfg.glass.keep_split!r}")
    if cfg.glass.local_kind == "impact":
        for f in ffns:
            f.down_norms = torch.linalg.vector_norm(f.down_t.float(), dim=1).contiguous()
    D = [f.D_full or f.D for f in ffns]  # selection ranks every neuron of a layer, on every rank
    k = layer_k(cfg.glass, D, [3 * f.d for f in ffns], stats)
    per_shard = tp is not None and cfg.tp_selection == "per-shard"
    if per_shard:
        k, selection = _shard_selection(cfg.glass, ffns, k, stats)
    else:
        selection = make_selection(cfg.glass, D, k, stats)
    _apply_cached_tuning(ffns)
    state = ServingState(ffns, k, selection, cfg.glass.backend, cfg.record_sets, cfg.batch_sets, tp, per_shard)
    if tp is None and cfg.batch_sets == "per-request" and ffns[0].gate.is_cpu:
        # (tensor parallel keeps the rows rule: every rank must take the same path)
        state.masked_from_rows = state.measure_masked_crossover()
    for pos, f in enumerate(ffns):
        module = model.get_submodule(f.name)
        module.forward = functools.partial(state.forward, pos)
    model.__dict__[_ATTR] = state
    kept = sum(kk * 3 * f.d for kk, f in zip(k, ffns)) / sum(3 * n * f.d for n, f in zip(D, ffns))
    g = cfg.glass
    logger.info("glass_kernels: serving %d FFN layers of %s: %s, keep %s (%s split, %.3f of the FFN weights per "
                "decode token), lam %s, %s sets%s", len(ffns), type(model).__name__, g.method, g.keep, g.keep_split,
                kept, g.effective_lam, cfg.batch_sets,
                "" if state.masked_from_rows is None else f" (masked dense FFN from {state.masked_from_rows} rows)")
    return state


def _shard_selection(glass, ffns, k, stats):
    """tp_selection="per-shard": each layer keeps round(k x D_rank / D) of this rank's neurons, ranked
    by their statistics and by the global ranks re-ranked within the shard (same order, 1 .. D_rank)."""
    from ..patch.config import NEEDS_GLOBAL
    from ..patch.selection import RankAggregation

    k_rank = [max(1, round(kk * f.D / f.D_full)) for kk, f in zip(k, ffns)]
    ranks = None
    if glass.method in NEEDS_GLOBAL:
        full = stats.ranks("impact" if glass.method == "i-glass" else "activation")
        ranks = [shard_ranks(r, f.offset, f.offset + f.D) for r, f in zip(full, ffns)]
    fit = stats.fit if glass.adaptive else None
    return k_rank, RankAggregation(glass, [f.D for f in ffns], k_rank, ranks, fit)


def _tensor_parallel() -> TensorParallel | None:
    """vLLM's tensor-parallel collectives, or None on one rank."""
    from vllm.distributed import (get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather,
                                  tensor_model_parallel_all_reduce)

    if get_tensor_model_parallel_world_size() == 1:
        return None
    return TensorParallel(lambda t: tensor_model_parallel_all_gather(t.contiguous(), dim=-1),
                          tensor_model_parallel_all_reduce)


def find_ffns(model) -> list[ServedFFN]:
    """Every gated MLP (gate_up_proj + act_fn + down_proj) of a vLLM model, by layer."""
    from vllm.model_executor.models.utils import extract_layer_index

    found = []
    for name, m in model.named_modules():
        if not all(hasattr(m, a) for a in ("gate_up_proj", "down_proj", "act_fn")):
            continue
        gu, down = m.gate_up_proj.weight, m.down_proj.weight
        if getattr(m.gate_up_proj, "bias", None) is not None or getattr(m.down_proj, "bias", None) is not None:
            raise ValueError(f"glass_kernels: {name} has biases; the sparse kernel serves bias-free gated FFNs")
        D = gu.shape[0] // 2
        down_t = down.t()
        if gu.shape[0] != 2 * D or not gu.is_contiguous() or not down_t.is_contiguous() or down_t.shape[0] != D:
            raise ValueError(f"glass_kernels: {name}'s weights are not in the plugin's layout (gate_up "
                             f"{tuple(gu.shape)}, down {tuple(down.shape)}); was it loaded with the plugin on?")
        found.append(ServedFFN(extract_layer_index(name), name, gu[:D], gu[D:], down_t, _activation(name, m.act_fn),
                               functools.partial(_dense, m)))
    if not found:
        raise ValueError(f"glass_kernels: no gated MLP (gate_up_proj, act_fn, down_proj) in {type(model).__name__}")
    found.sort(key=lambda f: f.index)
    return found


def _dense(mlp, x, mask=None):
    gate_up, _ = mlp.gate_up_proj(x)
    h = mlp.act_fn(gate_up)
    if mask is not None:
        h = h * mask
    y, _ = mlp.down_proj(h)
    return h, y


def _activation(name: str, act) -> str:
    kind = type(act).__name__
    if kind == "SiluAndMul":
        return "silu"
    if kind == "GeluAndMul":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    raise ValueError(f"glass_kernels: {name} uses {kind}; the plugin serves SiluAndMul and GeluAndMul FFNs")


def _apply_cached_tuning(ffns) -> None:
    """The decode kernel's per-machine setting, if ``python -m glass_kernels tune`` / an HF patch has
    measured one for this dtype and width (separate rows); the core's defaults otherwise."""
    from .. import _ext, tuning

    if not _ext.available() or not ffns[0].gate.is_cpu:
        return
    dtype, d = ffns[0].gate.dtype, ffns[0].d
    t = tuning.cached(dtype, d, "separate")
    if t is None:  # an HF patch's "auto" measurement, if it settled on separate rows
        t = tuning.cached(dtype, d, "auto")
        t = t if t is not None and t.layout == "separate" else None
    if t is not None:
        tuning.apply(t)
        logger.info("glass_kernels: decode setting %s, %d in flight, prefetch %d (cached)", t.isa,
                    t.neurons_in_flight, t.prefetch_neurons)
