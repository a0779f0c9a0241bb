#!/usr/bin/env bash
# Entry step of the thighseg Triton image: put the model repository somewhere writable, build the
# TensorRT engines for the GPU found here when they are missing or were built for another
# GPU/TensorRT/profile, then hand over to tritonserver (extra arguments are passed on).
#
#   MODEL_REPOSITORY       where tritonserver reads models (default /models; may be s3://... or gs://...)
#   MODEL_REPOSITORY_SEED  read-only repository copied into an empty MODEL_REPOSITORY first
#   MODEL_CONFIG_NAME      "cpu" serves configs/cpu.pbtxt (python backend, ONNX Runtime) without a GPU
#   SKIP_ENGINE_BUILD=1    serve the engines as they are (external model stores)
set -euo pipefail

repository="${MODEL_REPOSITORY:-/models}"
config_name="${MODEL_CONFIG_NAME:-}"
python="${PYTHON:-python3}"
tritonserver="${TRITONSERVER:-tritonserver}"

if [[ -n "${MODEL_REPOSITORY_SEED:-}" && "$repository" != *://* ]]; then
    mkdir -p "$repository"
    if [[ -z "$(ls -A "$repository")" ]]; then
        echo "thighseg: seeding $repository from $MODEL_REPOSITORY_SEED"
        cp -R "$MODEL_REPOSITORY_SEED/." "$repository/"
    fi
fi

if [[ "$config_name" != "cpu" && "${SKIP_ENGINE_BUILD:-0}" != "1" && "$repository" != *://* ]]; then
    "$python" -m thighseg.export.engines "$repository"
fi

args=("--model-repository=$repository")
[[ -n "$config_name" ]] && args+=("--model-config-name=$config_name")
exec "$tritonserver" "${args[@]}" "$@"
