#!/usr/bin/env bash
# Quick start, command 1: set up (if needed), then the offline demo on the embedded default
# (SmolLM2-135M + MiniLM; about 5.5 minutes on 2 CPU cores with native bfloat16, 30-60 in float32 on AVX2). Extra arguments go to `charshift demo`
# (default: --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
if [ "$#" -eq 0 ]; then set -- --quick; fi
exec "$VENV/bin/charshift" demo "$@"
