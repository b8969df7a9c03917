#!/usr/bin/env bash
# Set up (once) and run the test suite on the CPU. Extra arguments go to pytest.
# Installs what the tests need beyond Python first: each scripts/ci.d/*.sh installs or starts one
# thing (Debian's chromium for the browser tests, Slurm for the cluster tests; needs root/apt).
set -euo pipefail
cd "$(dirname "$0")/.."
for step in scripts/ci.d/*.sh; do
  [ -e "$step" ] || continue
  echo "test: $step"
  bash "$step"
done
bash scripts/setup.sh
export OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
exec .venv/bin/python -m pytest "$@"
