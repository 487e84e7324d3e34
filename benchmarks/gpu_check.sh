#!/usr/bin/env bash
# The GPU figures of issue 22 in one run, under 8 minutes on one H100/H200 (docs/PERFORMANCE.md, "GPU"):
# extraction Ray/bare and fraction of bf16 peak at configs/bench.yaml scale, FM and VM training Ray/bare.
#
#   benchmarks/gpu_check.sh                        # GPU: JSON + markdown to $OUT, else benchmarks/results/
#   benchmarks/gpu_check.sh --tiny --out /tmp/gc   # CPU: the same code paths at a tiny size
#
# Flags go to benchmarks/gpu_check.py (--help). Python: $PYTHON, else .venv/bin/python, else python3.
# GPU_CHECK_TIMEOUT (seconds, default 480; 3600 with --tiny) stops a run that would outlast the budget; the parts
# finished by then are already written.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" PYTHONUNBUFFERED=1
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: none (CPU run)"
limit=480
for arg in "$@"; do [ "$arg" = --tiny ] && limit=3600; done  # a loaded 2-core box may need more than 8 minutes
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-$limit}" "$PY" benchmarks/gpu_check.py "$@"
