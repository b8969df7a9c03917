#!/usr/bin/env bash
# The README's main command: set up (once), build the built-in corpus (once; Python's standard
# library, offline), train the tiny Qwen2-MoE with three routers as a local sweep tracked in
# ./mlruns.db, and write the `moe-lab compare` report. Interrupted? Run it again: finished members
# are skipped and the others resume from their last checkpoint.
# Usage: bash scripts/demo.sh [key=value ...] [sweep options]
#   key=value: overrides for every member (training.max_steps=50 for a shorter run)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
# One thread per training process (the sweep runs several at once); loopback-only MLflow.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 \
       MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
moe_lab() { "$REPO/.venv/bin/python" -m moe_lab "$@"; }

echo "== 1/3 built-in corpus: moe-lab data builtin --out data/builtin"
moe_lab data builtin --out data/builtin
echo "== 2/3 router ablation: moe-lab sweep experiments/router_ablation_small.yaml $*"
# All three members at once: on 2 cores as fast as two at a time, faster with more cores.
moe_lab sweep experiments/router_ablation_small.yaml --max-parallel 3 "$@"
echo "== 3/3 comparison: moe-lab compare"
parent=$(cat runs/sweeps/router_ablation_small/mlflow_parent_run_id)
moe_lab compare "$parent" --out compare/router_ablation_small
cat <<DONE

Report:   $REPO/compare/router_ablation_small/report.html
Runs:     $REPO/runs/sweeps/router_ablation_small/
MLflow:   .venv/bin/moe-lab ui      (then open http://127.0.0.1:5000, experiment router_ablation_small)
DONE
