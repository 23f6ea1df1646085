#!/usr/bin/env bash
# One-command GPU check: a ~100M-parameter policy, 3 AEPO iterations with the HF engine on CUDA,
# printing rollout/update tokens/s and peak GPU memory. Needs a CUDA build of torch and the project.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_LEVEL=WARNING
python scripts/gpu_check.py --device cuda "$@"
