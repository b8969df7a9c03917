#!/usr/bin/env bash
# GPU check for the parallel-training issue, run on the device machine after Transformer Engine
# is installed (../shared/device/README.md): the qwen1.5-moe-a2.7b preset cut to 4 layers,
# 20 steps with the te backend in bf16 and in FP8, plus the local backend on the tiny model.
# Logs go to ${OUT:-/tmp/moe-lab-gpu}.
set -uo pipefail
out=${OUT:-/tmp/moe-lab-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(tracking.enabled=false model.num_layers=4 training.max_steps=20 training.micro_batch_size=1
        training.global_batch_size=8 training.log_interval=1 checkpoint.enabled=false)
run() {
  name=$1; shift
  echo "== $name: moe-lab train $*" | tee "$out/$name.log"
  timeout 170 python3 -m moe_lab train "$@" --run-dir "/tmp/runs/$name" 2>&1 \
    | grep -v "Warning\|warn(" | tee -a "$out/$name.log" | grep -E "^step|error|Error" | tail -25
  cp "/tmp/runs/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
}
run local_tiny_bf16 experiments/tiny_moe.yaml training.precision=bf16 tracking.enabled=false training.max_steps=20 \
  checkpoint.enabled=false training.log_interval=5
run te_bf16 qwen1.5-moe-a2.7b "${common[@]}" training.precision=bf16
run te_fp8_tensorwise qwen1.5-moe-a2.7b "${common[@]}" training.precision=fp8 \
  training.fp8_recipe=tensorwise
run te_fp8_blockwise qwen1.5-moe-a2.7b "${common[@]}" training.precision=fp8 \
  training.fp8_recipe=blockwise
