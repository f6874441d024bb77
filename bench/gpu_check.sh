#!/usr/bin/env bash
# One GPU, five minutes: rollout tokens/s, learner tokens/s, weight-sync seconds and peak GPU memory
# of a ~0.5B-parameter Qwen-shaped model, as one RESULT line (see bench/gpu_check.py).
# Needs only this checkout and a Python with torch; no network, no vLLM, no transformers.
#   bench/gpu_check.sh                  # the check (exits 2 at once without a GPU)
#   bench/gpu_check.sh --device cpu --tiny   # a CPU smoke test of the same code
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch; install torch (pip install torch) or set PYTHON=/path/to/python" >&2
  exit 2
fi
exec "$PY" bench/gpu_check.py "$@"
