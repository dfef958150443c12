#!/usr/bin/env bash
# Acceptance check of every GPU path (issue 21): one PASS / FAIL / SKIP line per check plus the
# figures; exit status 1 if a check failed. On a CUDA machine with the project installed:
#   scripts/gpu_check.sh [--inception-weights PATH]
# Without CUDA, or with --smoke, the same checks run with a tiny network on the CPU (make test).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
exec "$PYTHON" scripts/gpu_check.py "$@"
