#!/usr/bin/env bash
# GPU check (run where CUDA is available): a few hundred AMP training steps of DELG, and extraction
# images/s at 512 px for ResNet-50 and EfficientNet-Lite0, batched vs one image at a time.
# Usage: benchmarks/gpu_check.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/gpu_check.py
