#!/usr/bin/env bash
# One prepared GPU check (benchmarks/gpu_suite.py): a short table, then one JSON line.
#   bash benchmarks/gpu_suite.sh            # a CUDA machine; stops within 8 minutes
#   bash benchmarks/gpu_suite.sh --dry-run  # tiny sizes on the CPU: the same JSON keys
# Offline: nothing is downloaded (random weights from configs; web requests go to a closed port).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9
export no_proxy= NO_PROXY= PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning"
exec timeout --signal=INT --kill-after=20 480 "$PYTHON" benchmarks/gpu_suite.py "$@"
