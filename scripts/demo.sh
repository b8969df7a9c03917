#!/usr/bin/env bash
# Set up (once) and train the tiny Qwen2-MoE on the CPU: the README's main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHDYNAMO_DISABLE=1
exec .venv/bin/moe-lab train experiments/tiny_moe.yaml "$@"
