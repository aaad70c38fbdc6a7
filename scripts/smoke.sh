#!/usr/bin/env bash
# A fresh install, as a new user gets it: a clean virtual environment, `scripts/setup.sh` without
# the test extras (so a runtime dependency that only peft/bitsandbytes bring in fails here), then a
# few `qlora train` steps on the embedded model. CI runs this before the tests (.ci/run).
# Usage: bash scripts/smoke.sh [VENV_DIR]   (default: a temporary directory, removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
VENV=${1:-$WORK/venv}
"${PYTHON:-python3}" -m venv "$VENV"
PYTHON="$VENV/bin/python" bash scripts/setup.sh
for i in 1 2 3 4 5 6 7 8; do  # eight Alpaca rows: the format the paper's data comes in
  echo "{\"instruction\": \"Add $i and $i.\", \"input\": \"\", \"output\": \"$((i + i))\"}"
done > "$WORK/train.jsonl"
cd "$WORK"  # nothing of the checkout on the path: the installed package runs
"$VENV/bin/qlora" train --data train.jsonl --max-steps 3 --batch-size 2 --lora-r 8 --val-fraction 0 \
  --save-steps 0 --logging-steps 1 --output-dir run > train.log 2>&1 || { cat train.log; exit 1; }
"$VENV/bin/python" - <<'PY'
import json
records = [json.loads(line) for line in open("run/metrics.jsonl")]
losses = [r["loss"] for r in records if "loss" in r]
assert [r["step"] for r in records] == [1, 2, 3] and all(x == x and x > 0 for x in losses), records
assert open("run/adapter_model.safetensors", "rb").read(8), "no adapter written"
print(f"smoke: a fresh install trained 3 steps of the embedded model (losses {losses}) and wrote the adapter")
PY
