#!/usr/bin/env bash
# Set up (once), build the built-in corpus (once; Python's standard library, offline) and train
# the tiny Qwen2-MoE on it on the CPU: the README's main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHDYNAMO_DISABLE=1
.venv/bin/moe-lab data builtin --out data/builtin
exec .venv/bin/moe-lab train experiments/tiny_moe_builtin.yaml "$@"
