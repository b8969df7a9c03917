#!/usr/bin/env bash
# GPU speed of the torch backend (issues 11 and 12), on nvidia-h200 (ep2 and the two-GPU tests of
# the pytest stage need nvidia-h200-x2). Stages (STAGES=...):
#  prof1, prof4  moe-lab bench --profile, shape A (Qwen1.5-MoE-A2.7B, 4 layers, seq 4096), mbs 1
#                and 4, variants $VARIANTS: tokens/s and ratios in one process, kernel classes,
#                top kernels, host time blocked in CUDA syncs;
#  ep2           the same for mcore_torch_bf16 as EP=2 on 2 GPUs (torchrun, mbs 1 per rank):
#                the dispatcher's share of the step;
#  ep2ov         EP=2 (2 GPUs, mbs 1 per rank), without and with parallel.overlap_grad_reduce;
#  ablate        one mcore_torch_bf16 model per mbs, timed with megatron's own optimizer step
#                (foreach AdamW, per-tensor norm and clipping fallbacks), then with moe-lab's
#                fused step (train/optim.py), then + megatron's native fused cross-entropy;
#  pytest        pytest tests/gpu (numerics and two-GPU layouts), reports as JSON;
#  lmloss        pytest tests/gpu/test_lm_loss.py only (fused LM loss against the unfused one);
#  gpu1          pytest tests/gpu/test_backends.py (one GPU: torch backend against local in bf16);
#  adamw         pytest tests/gpu/test_master_adamw.py (the fp32-master AdamW kernel against
#                megatron's update: training curves, the kernel alone against torch's + copy);
#  adamwprobe    scripts/adamw_probe.py: that kernel's block sizes and warps, against torch's
#                fused AdamW + copy and against the same arithmetic on one flat buffer;
#                PROBE_STATE=bf16: the precision-aware layout's update (20 bytes a parameter)
#                by block size, a bf16 copy, and the gradient norm (torch's, train/grad_norm.py's);
#  lmheadprobe   scripts/lm_head_probe.py: the fused LM loss at shape A's token counts by chunk size;
#  ce_curve      60 training steps of A (2 layers) with the fused LM loss and with megatron's;
#  trainA1       40 steps of `moe-lab train` at A mbs 1 (torch backend): the loop's own tokens/s;
#  syncs         scripts/host_syncs.py: the synchronising calls of one torch-backend step;
#  nanskip       8 steps of `moe-lab train` at A (2 layers, mbs 1) with a NaN gradient at step 3
#                (the test-only fault MOE_LAB_TEST_FAULT), training.on_nonfinite=skip and
#                aux-loss-free expert biases: the update skipped on the GPU, the rest trained;
#  gcA4          scripts/gc_probe.py: Python's garbage collector in back-to-back steps of A mbs 4;
#  gradacc       pytest tests/gpu/test_grad_accumulation.py (bf16 -> fp32 main_grad kernel);
#  profB2        moe-lab bench --profile of shape B (2 layers) at mbs 2, variants $VARIANTS;
#  teA4 teB8     (Transformer Engine installed) moe-lab bench of A mbs 4 and B (2 layers) mbs 8,
#                variants $TE_MATRIX;
#  paA12         (TE) A with 12 layers at mbs 2 (fits one H200 only with the precision-aware
#                optimizer's bf16 state): transformers pure bf16, torch and te-FP8 backends;
#  dispA1 dispA4 shape A at mbs 1 and 4: the torch backend with megatron's alltoall dispatcher
#                (the default) and with allgather, against transformers pure bf16;
#  fp8_curve     (TE) 100 training steps of A (2 layers) with the te backend in bf16 and in FP8
#                with each recipe of $FP8_RECIPES;
#  pa            (TE) pytest tests/gpu/test_precision_aware.py;
#  kA1 kA12      (TE) A mbs 1 and A with 12 layers at mbs 2: the precision-aware optimizer's
#                bf16 state ($pak, fp32 master copy) stepped by moe-lab's kernel;
#  rA1 rA12      (TE) the same points, transformers pure bf16 against $pak and against $pa (the
#                master weights as bf16 weights + int16 remainders, also stepped by the kernel);
#  ropeA1 ropeA4 (TE) A mbs 1 or 4: transformers pure bf16 against $pa with the defaults (TE's
#                fused RoPE, cuDNN's attention), with torch's flash attention, and with both
#                as before the twelfth session (flash, megatron's unfused RoPE);
#  paA4          (TE) A mbs 4: the precision-aware optimizer with moe-lab's default (a full fp32
#                master copy, store_param_remainders=false) and with the remainders on;
#  fp8probe      scripts/fp8_grouped_probe.py: rowwise FP8 `_scaled_grouped_mm` against bf16
#                `grouped_mm` for one layer's expert GEMMs at shapes A and B, quantisation included;
#  sdpaprobe     scripts/sdpa_probe.py: causal SDPA forward + backward per kernel (flash, cuDNN,
#                memory-efficient) at shapes A and B, against flash's numbers;
#  fp8dense      scripts/fp8_dense_probe.py: A mbs 4's dense GEMMs (attention, shared expert, LM
#                head) in bf16 against FP8 `_scaled_mm` with the operands already quantised;
#  A1 A4 A8 B1 B2 B4 B8  moe-lab bench (no profile) of shape A at mbs 1 and 4, A with 8 layers at
#                mbs 2, shape B (Qwen2-57B-A14B layers, 2 layers: 4 do not fit one H200 with
#                fp32 master weights) at mbs 1, 2, 4 or 8; variants $MATRIX (default: transformers
#                pure bf16 and fp32 master, the torch backend with the fused LM loss and with
#                megatron's unfused one).
# Everything lands in ${OUT}/results.tgz (refreshed after each stage) and the logs beside it.
set -uo pipefail
out=${OUT:-/tmp/moe-lab-prof}
res=/tmp/moe-lab-prof-results
mkdir -p "$out" "$res"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
# With Transformer Engine imported, torch's own SDPA choice on the device falls back from cuDNN to
# flash: TE loads a cuDNN 9.14 beside torch's 9.19 (setting CUDNN_PATH to torch's did not
# change that, sdpa_probe --import-te in the twelfth session). Asked for explicitly, torch's cuDNN
# attention still runs (model.attention_backend=auto does); transformers' SDPA takes flash there.
pack() { tar czf "$out/results.tgz" -C "$res" . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$res/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$res/gpu.txt"
# drops warnings and blank lines, but keeps pytest's summary ("4 passed, 128 warnings")
quiet() { grep -v -i -P '^(?!.*\d+ (passed|failed)).*warn|^$' ; }
A=(--preset qwen1.5-moe-a2.7b --layers 4 --seq 4096)
stages=${STAGES:-"prof1 prof4 ep2 ablate"}
variants=${VARIANTS:-hf_grouped_bf16,hf_grouped_fp32,mcore_torch_bf16}
# With Transformer Engine installed (moe-lab still steps with torch's AdamW and its own kernel;
# `+optimizer.update_impl=megatron` for megatron's step with TE's FusedAdam), the precision-aware
# optimizer with bf16 moments and main gradients (the 2026-11-30 runs had the master weights'
# remainders on, megatron's default: store_param_remainders=true), the TE backend in bf16 and FP8 (blockwise).
pa=optimizer.precision_aware=true+optimizer.exp_avg_dtype=bf16+optimizer.exp_avg_sq_dtype=bf16+optimizer.main_grads_dtype=bf16+optimizer.store_param_remainders=true
# The same without the remainders (a full fp32 master copy in TE's state). train/master_adamw.py's
# kernel steps both (PrecisionAwareAdamW; the remainders since the eleventh session).
pak=${pa%+optimizer.store_param_remainders=true}
te_matrix=${TE_MATRIX:-hf_grouped_bf16,mcore_torch_bf16,mcore_torch_bf16+$pa,mcore_te_bf16,mcore_te_fp8+training.fp8_recipe=blockwise,mcore_te_fp8+training.fp8_recipe=blockwise+$pa}
matrix=${MATRIX:-hf_grouped_bf16,hf_grouped_fp32,mcore_torch_bf16,mcore_torch_bf16+training.cross_entropy=megatron}
bench() {  # stage name, timeout, bench arguments...
  local name=$1 limit=$2; shift 2
  # shellcheck disable=SC2086  # $BENCH_ARGS: extra bench options for every stage, e.g. --steps 24
  timeout "$limit" python3 -m moe_lab bench "$@" ${BENCH_ARGS:-} --out "$res/bench_$name.json" \
    2>&1 | quiet > "$res/$name.log"
}

for stage in $stages; do
  start=$(date +%s)
  case $stage in
  prof1|prof4)
    mbs=${stage#prof}
    timeout $((mbs == 1 ? 240 : 300)) python3 -m moe_lab bench "${A[@]}" --mbs "$mbs" \
      --variants "$variants" --out "$res/bench_mbs$mbs.json" \
      --profile "$res/prof_mbs$mbs" 2>&1 | quiet > "$res/$stage.log"
    ;;
  ep2)
    timeout 90 python3 -m torch.distributed.run --nproc-per-node 2 -m moe_lab bench "${A[@]}" \
      --mbs 1 --variants mcore_torch_bf16 --out "$res/bench_ep2_mbs1.json" \
      --profile "$res/prof_ep2_mbs1" parallel.ep=2 2>&1 | quiet > "$res/$stage.log"
    ;;
  ep2ov)  # EP=2 at A mbs 1 without and with megatron's overlap_grad_reduce (no profile)
    timeout 150 python3 -m torch.distributed.run --nproc-per-node 2 -m moe_lab bench "${A[@]}" \
      --mbs 1 --variants mcore_torch_bf16,mcore_torch_bf16+parallel.overlap_grad_reduce=true \
      --out "$res/bench_ep2ov_mbs1.json" parallel.ep=2 2>&1 | quiet > "$res/$stage.log"
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
    # megatron's own step first (its foreach AdamW keeps CPU step counters; the fused path's
    # pre-hook moves them to the GPU when it takes over)
    for s in subs:
        s.optimizer.moe_lab_fused = False
        for g in s.optimizer.param_groups:
            g["fused"], g["foreach"] = None, None
    run("megatron_step")
    for s in subs:
        s.optimizer.moe_lab_fused = True
        for g in s.optimizer.param_groups:
            g["fused"], g["foreach"] = True, False
    run("moe_lab_fused_step", warmup=2)
    try:
        config.cross_entropy_loss_fusion, config.cross_entropy_fusion_impl = True, "native"
        run("fused_step+native_ce", warmup=3)
    except Exception as err:
        print("native CE failed:", repr(err)[:300], flush=True)
    config.cross_entropy_loss_fusion = False
    results[f"mbs{mbs}"] = {"info": info, "rows": rows}
    del trainer, model, optimizer, scheduler, step
    import gc; gc.collect(); torch.cuda.empty_cache()
json.dump(results, open("/tmp/moe-lab-prof-results/ablation.json", "w"), indent=1)
shutdown_distributed()
EOF
    ;;
  A1) bench A1 200 "${A[@]}" --mbs 1 --variants "$matrix" ;;
  A4) bench A4 240 "${A[@]}" --mbs 4 --variants "$matrix" ;;
  A8) bench A8 240 --preset qwen1.5-moe-a2.7b --layers 8 --seq 4096 --mbs 2 \
        --variants "${MATRIX8:-hf_grouped_bf16,mcore_torch_bf16}" ;;
  B1|B2|B4|B8) bench "$stage" 300 --preset qwen2-57b-a14b --layers 2 --seq 4096 --mbs "${stage#B}" \
        --variants "${MATRIXB:-hf_grouped_bf16,mcore_torch_bf16,mcore_torch_bf16+training.cross_entropy=megatron}" ;;
  profB2) timeout 300 python3 -m moe_lab bench --preset qwen2-57b-a14b --layers 2 --seq 4096 \
        --mbs 2 --variants "$variants" --out "$res/bench_profB2.json" --profile "$res/prof_B2" \
        2>&1 | quiet > "$res/$stage.log" ;;
  teA4) bench teA4 420 "${A[@]}" --mbs 4 --variants "$te_matrix" ;;
  teB8) bench teB8 570 --preset qwen2-57b-a14b --layers 2 --seq 4096 --mbs 8 \
        --variants "$te_matrix" ;;
  paA12) bench paA12 420 --preset qwen1.5-moe-a2.7b --layers 12 --seq 4096 --mbs 2 \
        --variants "${MATRIX12:-hf_grouped_bf16,mcore_torch_bf16+$pa,mcore_te_fp8+training.fp8_recipe=blockwise+$pa}" ;;
  dispA1|dispA4)  # megatron's two dispatchers at EP=1: alltoall sorts tokens by local expert
        # (an identity at EP=1: ~200 host ops a layer on the CPU), allgather does not but syncs twice
        bench "$stage" 300 "${A[@]}" --mbs "${stage#dispA}" \
        --variants "hf_grouped_bf16,mcore_torch_bf16,mcore_torch_bf16+moe.dispatcher=allgather" ;;
  fp8_curve)  # 100 training steps of A (2 layers) with TE in bf16 and in FP8 with each recipe
    # of $FP8_RECIPES (default blockwise); same data and weights
    for run in bf16 ${FP8_RECIPES:-blockwise}; do
      prec=fp8; recipe=$run
      [ "$run" = bf16 ] && prec=bf16 recipe=blockwise
      timeout 200 python3 -m moe_lab train qwen1.5-moe-a2.7b --run-dir "$res/fp8c_$run" \
        model.num_layers=2 model.backend=te training.precision=$prec \
        training.fp8_recipe=$recipe \
        training.seq_length=4096 training.micro_batch_size=2 training.global_batch_size=4 \
        training.max_steps=100 training.log_interval=1 checkpoint.enabled=false \
        tracking.enabled=false 2>&1 | quiet > "$res/fp8c_$run.log"
    done ;;
  kA1) bench kA1 300 "${A[@]}" --mbs 1 \
        --variants "hf_grouped_bf16,mcore_torch_bf16,mcore_torch_bf16+$pak" ;;
  kA12) bench kA12 400 --preset qwen1.5-moe-a2.7b --layers 12 --seq 4096 --mbs 2 \
        --variants "hf_grouped_bf16,mcore_torch_bf16+$pak" ;;
  rA1) bench rA1 300 "${A[@]}" --mbs 1 \
        --variants "hf_grouped_bf16,mcore_torch_bf16+$pak,mcore_torch_bf16+$pa" ;;
  ropeA1|ropeA4) bench "$stage" 400 "${A[@]}" --mbs "${stage#ropeA}" \
        --variants "hf_grouped_bf16,mcore_torch_bf16+$pa,mcore_torch_bf16+$pa+model.attention_backend=flash,mcore_torch_bf16+$pa+model.attention_backend=flash+model.rope_fusion=false" ;;
  rA12) bench rA12 400 --preset qwen1.5-moe-a2.7b --layers 12 --seq 4096 --mbs 2 \
        --variants "hf_grouped_bf16,mcore_torch_bf16+$pak,mcore_torch_bf16+$pa" ;;
  paA4) bench paA4 300 "${A[@]}" --mbs 4 \
        --variants "hf_grouped_bf16,mcore_torch_bf16,mcore_torch_bf16+${pa%+optimizer.store_param_remainders=true},mcore_torch_bf16+$pa" ;;
  fp8dense) timeout 200 python3 scripts/fp8_dense_probe.py --out "$res/fp8_dense_probe.json" \
        2>&1 | quiet > "$res/$stage.log" ;;
  sdpaprobe) timeout 200 python3 scripts/sdpa_probe.py --out "$res/sdpa_probe.json" \
        2>&1 | quiet > "$res/$stage.log"
    if python3 -c "import transformer_engine" 2>/dev/null; then
      timeout 200 python3 scripts/sdpa_probe.py --import-te --out "$res/sdpa_probe_te.json" \
        2>&1 | quiet >> "$res/$stage.log"
    fi ;;
  fp8probe) timeout 300 python3 scripts/fp8_grouped_probe.py --out "$res/fp8_probe.json" \
        2>&1 | quiet > "$res/$stage.log" ;;
  pa)
    MOE_LAB_GPU_REPORT="$res/gpu_reports" timeout 550 python3 -m pytest \
      tests/gpu/test_precision_aware.py -q -s -p no:cacheprovider 2>&1 | quiet > "$res/$stage.log"
    ;;
  gcA4)  # Python's garbage collector during back-to-back steps of A mbs 4 (on, then off)
    timeout 200 python3 scripts/gc_probe.py --layers 4 --mbs 4 --out "$res/gc_A4.json" \
      2>&1 | quiet > "$res/$stage.log" ;;
  gradacc)
    MOE_LAB_GPU_REPORT="$res/gpu_reports" timeout 200 python3 -m pytest \
      tests/gpu/test_grad_accumulation.py -q -s -p no:cacheprovider 2>&1 | quiet > "$res/$stage.log"
    ;;
  syncs)  # where one step of the torch backend (A, 2 layers, mbs 1) makes the host wait
    timeout 200 python3 scripts/host_syncs.py --layers 2 2>&1 | quiet > "$res/$stage.log" ;;
  trainA1)  # moe-lab train itself at the bench's A mbs 1 shape: its logged tokens/s per step
    timeout 200 python3 -m moe_lab train qwen1.5-moe-a2.7b --run-dir /tmp/runs/trainA1 \
      model.num_layers=4 model.backend=torch training.precision=bf16 training.seq_length=4096 \
      training.micro_batch_size=1 training.global_batch_size=1 training.max_steps=40 \
      training.log_interval=1 checkpoint.enabled=false tracking.enabled=false \
      2>&1 | quiet > "$res/$stage.log"
    cp /tmp/runs/trainA1/metrics.jsonl "$res/trainA1.metrics.jsonl" ;;
  nanskip)
    MOE_LAB_TEST_FAULT=nan@grads:3 timeout 200 python3 -m moe_lab train qwen1.5-moe-a2.7b \
      --run-dir /tmp/runs/nanskip model.num_layers=2 model.backend=torch training.precision=bf16 \
      training.seq_length=4096 training.micro_batch_size=1 training.global_batch_size=1 \
      training.max_steps=8 training.log_interval=1 training.on_nonfinite=skip \
      moe.router.expert_bias=true checkpoint.enabled=false tracking.enabled=false \
      2>&1 | quiet > "$res/$stage.log"
    cp /tmp/runs/nanskip/metrics.jsonl "$res/nanskip.metrics.jsonl" ;;
  ce_curve)  # the fused LM loss and megatron's over 60 training steps, same data and weights
    for ce in fused_linear megatron; do
      timeout 150 python3 -m moe_lab train qwen1.5-moe-a2.7b --run-dir "$res/ce_$ce" \
        model.num_layers=2 model.backend=torch training.precision=bf16 training.seq_length=4096 \
        training.micro_batch_size=1 training.global_batch_size=4 training.max_steps=60 \
        training.log_interval=10 training.cross_entropy=$ce checkpoint.enabled=false \
        tracking.enabled=false 2>&1 | quiet > "$res/ce_$ce.log"
    done ;;
  gpu1)
    MOE_LAB_GPU_REPORT="$res/gpu_reports" timeout 300 python3 -m pytest tests/gpu/test_backends.py \
      -q -s -p no:cacheprovider 2>&1 | quiet > "$res/$stage.log"
    ;;
  adamw)
    MOE_LAB_GPU_REPORT="$res/gpu_reports" timeout 240 python3 -m pytest tests/gpu/test_master_adamw.py \
      -q -s -p no:cacheprovider 2>&1 | quiet > "$res/$stage.log"
    ;;
  lmheadprobe) timeout 200 python3 scripts/lm_head_probe.py --out "$res/lm_head_probe.json" \
        2>&1 | quiet > "$res/$stage.log" ;;
  adamwprobe) timeout 200 python3 scripts/adamw_probe.py --state "${PROBE_STATE:-fp32}" \
        --out "$res/adamw_probe_${PROBE_STATE:-fp32}.json" \
        2>&1 | quiet > "$res/$stage.log" ;;
  lmloss)
    MOE_LAB_GPU_REPORT="$res/gpu_reports" timeout 240 python3 -m pytest tests/gpu/test_lm_loss.py \
      -q -s -p no:cacheprovider 2>&1 | quiet > "$res/$stage.log"
    ;;
  pytest)
    MOE_LAB_GPU_REPORT="$res/gpu_reports" timeout 480 python3 -m pytest tests/gpu -q -s \
      -p no:cacheprovider 2>&1 | quiet > "$res/$stage.log"
    ;;
  esac
  echo "== $stage: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$res/stages.txt"
  tail -40 "$res/$stage.log"
  pack
done
cp "$res"/prof_mbs1/*.md "$res"/prof_mbs4/*.md "$out"/ 2>/dev/null
ls -la "$res" "$out"
