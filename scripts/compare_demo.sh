#!/usr/bin/env bash
# Three tiny-MoE trainings at different learning rates (one MLflow experiment), their
# `moe-lab compare` report, and a screenshot of it: docs/img/compare_report.png, which the README
# shows. A few minutes on 2 CPU cores. Needs /usr/bin/chromium (scripts/ci.d/chromium.sh).
# Usage: bash scripts/compare_demo.sh [WORK_DIR]   (PYTHON=... to choose the interpreter)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true MOE_LAB_QUIET=1
cd "$WORK"
for lr in 1e-3 3e-3 1e-2; do
  echo "training lr=$lr in $WORK/runs/lr$lr"
  "$PY" -m moe_lab train "$REPO/experiments/tiny_moe.yaml" --run-dir "runs/lr$lr" \
    optimizer.lr="$lr" tracking.experiment=lr_demo tracking.run_name="lr=$lr" \
    training.log_interval=1 checkpoint.enabled=false
done
"$PY" -m moe_lab compare lr_demo --out report
"$PY" "$REPO/scripts/screenshot.py" report/report.html "$REPO/docs/img/compare_report.png"
