#!/usr/bin/env bash
# Where the torch backend's step time goes (issues 11 and 12), one device call on nvidia-h200-x2:
#  1. moe-lab bench --profile: hf_grouped_bf16 vs mcore_torch_bf16, shape A (Qwen1.5-MoE-A2.7B,
#     4 layers, seq 4096), mbs 1 and 4: kernel classes, top kernels, host time in syncs;
#  2. the same profile for EP=2 on 2 GPUs (torchrun, mbs 1 per rank): dispatcher's share;
#  3. an ablation of the mcore_torch_bf16 step in one process (same model, same tokens):
#     megatron's optimizer as built, then with torch's fused AdamW kernel, then with megatron's
#     native fused cross-entropy, then without gradient clipping (to price each).
# Everything lands in ${OUT}/results.tgz (refreshed after each stage) and the logs beside it.
set -uo pipefail
out=${OUT:-/tmp/moe-lab-prof}
res=/tmp/moe-lab-prof-results
mkdir -p "$out" "$res"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
pack() { tar czf "$out/results.tgz" -C "$res" . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$res/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$res/gpu.txt"
quiet() { grep -v -i "warn\|_warn_once\|^  warnings\.\|^$" ; }
A=(--preset qwen1.5-moe-a2.7b --layers 4 --seq 4096)
stages=${STAGES:-"prof1 prof4 ep2 ablate"}

for stage in $stages; do
  start=$(date +%s)
  case $stage in
  prof1|prof4)
    mbs=${stage#prof}
    timeout $((mbs == 1 ? 140 : 160)) python3 -m moe_lab bench "${A[@]}" --mbs "$mbs" \
      --variants hf_grouped_bf16,mcore_torch_bf16 --out "$res/bench_mbs$mbs.json" \
      --profile "$res/prof_mbs$mbs" 2>&1 | quiet > "$res/$stage.log"
    ;;
  ep2)
    timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 -m moe_lab bench "${A[@]}" \
      --mbs 1 --variants mcore_torch_bf16 --out "$res/bench_ep2_mbs1.json" \
      --profile "$res/prof_ep2_mbs1" parallel.ep=2 2>&1 | quiet > "$res/$stage.log"
    ;;
  ablate)
    timeout 150 python3 - <<'EOF' 2>&1 | quiet > "$res/$stage.log"
import dataclasses, json, os
import torch
from moe_lab import config as config_lib
from moe_lab.bench import mcore
from moe_lab.bench.timing import measure
from moe_lab.data import SyntheticTokens
from moe_lab.launch.distributed import detect_env, init_distributed, shutdown_distributed
from moe_lab.train.loop import build_training
from moe_lab.train.step import Trainer

base = ["model.num_layers=4", "training.seq_length=4096", "optimizer.warmup_steps=0",
        "checkpoint.enabled=false", "model.backend=torch", "training.precision=bf16",
        "tracking.enabled=false"]
cfg0 = config_lib.load("qwen1.5-moe-a2.7b", base)
init_distributed(cfg0, detect_env({}), use_gpu=True)
results = {}
for mbs in (1, 4):
    cfg = config_lib.load("qwen1.5-moe-a2.7b", base + [f"training.micro_batch_size={mbs}",
                                                        f"training.global_batch_size={mbs}"])
    config, model, optimizer, scheduler = build_training(cfg, use_gpu=True)
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    batch = data.batch(list(range(mbs)))
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    counter, losses = iter(range(10**9)), []
    def step():
        losses.append(trainer.step(next(counter), [batch]))
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    info = {"optimizer": [type(s).__name__ + "/" + type(s.optimizer).__module__ + "."
                          + type(s.optimizer).__name__ for s in subs],
            "groups": [{k: g.get(k) for k in ("foreach", "fused", "capturable")}
                       for s in subs for g in s.optimizer.param_groups][:2],
            "clip_grad": subs[0].config.clip_grad}
    rows = {}
    def run(name, warmup=3):
        t = measure(step, warmup=warmup, steps=6, profiled_steps=1)
        last = losses[-1]
        rows[name] = {"wall_ms": t.wall_ms, "gpu_ms": t.gpu_ms, "host_ms": t.host_ms,
                      "peak_gb": t.peak_gb, "tokens_per_s": mbs * 4096 / t.wall_ms * 1e3,
                      "loss_last": last["loss/lm"], "grad_norm_last": last.get("grad_norm")}
        print(mbs, name, json.dumps(rows[name]), flush=True)
    run("as_built")
    for s in subs:
        for g in s.optimizer.param_groups:
            g["fused"], g["foreach"] = True, False
    run("fused_adamw", warmup=2)
    try:
        config.cross_entropy_loss_fusion, config.cross_entropy_fusion_impl = True, "native"
        run("fused_adamw+native_ce", warmup=3)
    except Exception as err:
        print("native CE failed:", repr(err)[:300], flush=True)
        config.cross_entropy_loss_fusion = False
    for s in subs:
        s.config.clip_grad = 0.0
    run("...+no_grad_clip", warmup=1)
    results[f"mbs{mbs}"] = {"info": info, "rows": rows}
    del trainer, model, optimizer, scheduler, step
    import gc; gc.collect(); torch.cuda.empty_cache()
json.dump(results, open("/tmp/moe-lab-prof-results/ablation.json", "w"), indent=1)
shutdown_distributed()
EOF
    ;;
  esac
  echo "== $stage: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$res/stages.txt"
  tail -40 "$res/$stage.log"
  pack
done
cp "$res"/prof_mbs1/*.md "$res"/prof_mbs4/*.md "$out"/ 2>/dev/null
ls -la "$res" "$out"
