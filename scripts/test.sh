#!/usr/bin/env bash
# Quick start, command 2: set up (if needed), then the test suite. Extra arguments go to pytest
# (e.g. `-m "not slow"` to skip the real-model tests locally; CI runs everything).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest "$@"
