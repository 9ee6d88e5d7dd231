#!/usr/bin/env bash
# One-GPU benchmark, offline (bench/gpu.py; docs/benchmarks.md, "GPU"). Under 8 minutes on one GPU.
#   bash bench/gpu.sh [--tiny] [--out DIR] [any bench/gpu.py option]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
mkdir -p bench/out
"$PY" bench/gpu.py "$@" 2>&1 | tee "bench/out/gpu-$(date +%Y%m%d-%H%M%S).log"
exit "${PIPESTATUS[0]}"
