#!/usr/bin/env bash
# GPU check in one command (run on a machine with an NVIDIA GPU):
#   installs tensorrt from PyPI if missing, builds the FP16 engine of every model, validates it
#   against ONNX Runtime FP32 on phantom slices, serves the engines with a GPU tritonserver when one
#   is on PATH (official Triton container), and prints a short table. Figures go to gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
"$PYTHON" -c "import tensorrt" 2>/dev/null || "$PYTHON" -m pip install -q tensorrt
"$PYTHON" -c "import thighseg" 2>/dev/null || "$PYTHON" -m pip install -q -e ".[train]"
exec "$PYTHON" scripts/gpu_check.py "$@"
