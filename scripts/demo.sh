#!/usr/bin/env bash
# The main job: install, then finetune the embedded model on the built-in task (before/after scores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m qlora train "$@"
