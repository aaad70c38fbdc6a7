#!/usr/bin/env bash
# The test suite: install (with the test-only peers bitsandbytes, peft, torchao), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --timeout 1200 "$@"
