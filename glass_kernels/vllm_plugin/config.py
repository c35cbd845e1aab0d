"""What the plugin reads from vLLM's configuration: ``additional_config={"glass": {...}}``.

The plugin does nothing unless that key is present. Its value is a JSON object:

    method, keep, lam, keep_split, seed, backend   as in glass_kernels.GlassConfig
    stats         path of the model's GlobalStats file (safetensors; needed by a-glass, i-glass,
                  global and the adaptive options)
    batch_sets    "per-request" (default): each request decodes with its own set, so one step reads
                  the union of its requests' sets; "shared": the requests decoding together share one
                  set per layer, chosen from their pooled statistics (each request's statistic
                  normalised by its prompt length) whenever the batch's make-up changes, so a step
                  reads k rows per layer at any batch size, at some cost in quality per request
    tp_selection  with tensor parallelism: "gather" (default): the ranks gather each request's
                  statistics and keep, between them, exactly the one-rank set (TP N decodes with TP 1's
                  sets); "per-shard": each rank chooses k / N of its own neurons from its own share of
                  the statistics, so every rank does equal work (a-glass, i-glass, griffin)
    record_sets   keep the neuron sets of the last 256 finished requests, for tests and inspection
                  (``glass_state(model).request_sets()``); default false

GlassConfig's patch-only fields (strategy, layout, weights, tune) do not apply here and are refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..patch.config import NEEDS_GLOBAL, GlassConfig

CONFIG_KEY = "glass"
_GLASS_FIELDS = ("method", "keep", "lam", "keep_split", "seed", "backend")
_PLUGIN_FIELDS = ("stats", "record_sets", "batch_sets", "tp_selection")
BATCH_SETS = ("per-request", "shared")
TP_SELECTIONS = ("gather", "per-shard")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    glass: GlassConfig
    stats_path: str | None = None
    record_sets: bool = False
    batch_sets: str = "per-request"
    tp_selection: str = "gather"

    @property
    def dense(self) -> bool:
        """Whether every layer keeps every neuron: the plugin then leaves vLLM's model untouched."""
        return self.glass.method == "dense" or self.glass.keep >= 1.0


def parse(raw: Any) -> ServingConfig:
    """``additional_config["glass"]`` as a ServingConfig (ValueError / TypeError naming the problem)."""
    if not isinstance(raw, dict):
        raise TypeError(f'additional_config["{CONFIG_KEY}"] must be a JSON object, got {type(raw).__name__}')
    unknown = sorted(set(raw) - set(_GLASS_FIELDS) - set(_PLUGIN_FIELDS))
    if unknown:
        raise ValueError(f'additional_config["{CONFIG_KEY}"]: unknown key(s) {unknown}; '
                         f"valid keys: {sorted(_GLASS_FIELDS + _PLUGIN_FIELDS)}")
    glass = GlassConfig(**{k: raw[k] for k in _GLASS_FIELDS if k in raw})
    stats = raw.get("stats")
    if stats is not None:
        if not isinstance(stats, str):
            raise TypeError(f'additional_config["{CONFIG_KEY}"]["stats"] must be a file path, got {stats!r}')
        stats = os.path.expanduser(stats)
    dense = glass.method == "dense" or glass.keep >= 1.0
    if (glass.method in NEEDS_GLOBAL or glass.adaptive) and stats is None and not dense:
        raise ValueError(
            f'method={glass.method!r} (lam={glass.lam!r}, keep_split={glass.keep_split!r}) needs the model\'s '
            f'global statistics: add "stats": "<file>" to additional_config["{CONFIG_KEY}"] (make the file '
            "with `python -m glass_kernels calibrate --model <name or HF folder> -o <file>`)")
    record = raw.get("record_sets", False)
    if not isinstance(record, bool):
        raise TypeError(f'additional_config["{CONFIG_KEY}"]["record_sets"] must be true or false, got {record!r}')
    batch_sets = raw.get("batch_sets", "per-request")
    if batch_sets not in BATCH_SETS:
        raise ValueError(f'additional_config["{CONFIG_KEY}"]["batch_sets"] must be one of {BATCH_SETS}, got {batch_sets!r}')
    tp_selection = raw.get("tp_selection", "gather")
    if tp_selection not in TP_SELECTIONS:
        raise ValueError(f'additional_config["{CONFIG_KEY}"]["tp_selection"] must be one of {TP_SELECTIONS}, '
                         f"got {tp_selection!r}")
    if tp_selection == "per-shard" and glass.method not in ("a-glass", "i-glass", "griffin"):
        raise ValueError(f'tp_selection="per-shard" ranks each shard\'s own statistics: a-glass, i-glass or '
                         f"griffin, not {glass.method!r}")
    return ServingConfig(glass, stats, record, batch_sets, tp_selection)


def from_vllm(vllm_config) -> ServingConfig | None:
    """The plugin's configuration in ``vllm_config`` (None: the plugin is off), after checking that
    the engine settings let it see every prompt token (ValueError naming the setting otherwise)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict) or CONFIG_KEY not in extra:
        return None
    cfg = parse(extra[CONFIG_KEY])
    if cfg.dense:
        return cfg
    problems = []
    if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        problems.append("prefix caching is on (a cached prefix is never run, so its tokens add nothing to the "
                        "request's statistics): pass enable_prefix_caching=False / --no-enable-prefix-caching")
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding is not supported with GLASS sparse decoding")
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size != 1:
        problems.append(f"pipeline_parallel_size={par.pipeline_parallel_size}: the plugin serves tensor "
                        "parallelism only (pipeline_parallel_size 1)")
    if getattr(vllm_config, "lora_config", None) is not None:
        problems.append("LoRA adapters wrap the MLP's linears with their own weights: not supported with GLASS")
    if getattr(vllm_config.model_config, "quantization", None):
        problems.append(f"quantization={vllm_config.model_config.quantization!r}: the sparse kernel reads "
                        "fp32/bf16/fp16 FFN weights")
    if problems:
        raise ValueError("glass_kernels vLLM plugin: " + "; ".join(problems))
    return cfg
