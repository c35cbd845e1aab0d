#!/usr/bin/env bash
# The vLLM plugin's tests in vLLM's CPU backend (tests/serving_vllm): a venv of its own (scripts/setup_vllm.sh),
# tiny random Llama / Qwen3 / Gemma-3 models and the real SmolLM2 against glass_kernels.patch on
# Hugging Face transformers, chunked prefill and preemption, and `vllm serve` on localhost.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
VENV=${VENV_VLLM:-.venv-vllm}
"$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider tests/serving_vllm
