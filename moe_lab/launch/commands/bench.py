"""`moe-lab bench`: training-step speed of moe-lab backends and transformers, side by side."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

DEFAULT_VARIANTS = "hf_grouped_bf16,hf_grouped_fp32,mcore_te_bf16,mcore_torch_bf16"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time training steps of moe-lab backends against transformers",
        description="Build each variant in turn (same shape, tokens and AdamW; on one GPU "
                    "each in a child process of its own, under torchrun or --in-process in "
                    "this one), time fwd+bwd+optimizer steps after "
                    "warm-up and print tokens/s, model TFLOP/s, MFU, peak memory, time per step "
                    "and the ratio of every row to each transformers baseline. 'step ms' (and "
                    "tokens/s): steps back to back as in training (moe-lab variants queue the "
                    "next step's forward and backward before reading a step's loss, as "
                    "`moe-lab train` does between checkpoints); 'isolated ms': the median step "
                    "synchronised at both ends "
                    "(the host's time to issue the forward exposed); 'GPU ms': kernel time; "
                    "'host ms': the Python thread's CPU time of an isolated step.",
        epilog="example: moe-lab bench --preset qwen1.5-moe-a2.7b --layers 4 --seq 4096 --mbs 4 "
               "--variants hf_grouped_bf16,mcore_torch_bf16,mcore_te_fp8 --out bench.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen1.5-moe-a2.7b",
                        help="experiment config or preset giving the model shape")
    parser.add_argument("--layers", type=int, default=4, help="number of layers to keep")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--mbs", type=int, default=1, help="micro-batch size (sequences)")
    parser.add_argument("--variants", "--backends", default=DEFAULT_VARIANTS,
                        help="comma list of hf_eager, hf_grouped_bf16, hf_grouped_fp32, "
                             "mcore_{local,te,torch}_{fp32,bf16,fp8}; '+key=value' after a "
                             "name gives that variant its own overrides, e.g. "
                             "mcore_torch_bf16+training.cross_entropy=megatron (parallel.* "
                             "but overlap_grad_reduce only on the command line: one layout)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="per-GPU peak for MFU (989 = H100/H200 dense bf16)")
    parser.add_argument("--out", help="also write the rows as JSON to this file")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile 2 more steps of each variant (torch.profiler) and "
                             "write DIR/<variant>.md and .json: top CUDA kernels, GPU time per "
                             "class (expert GEMM, attention, optimizer, dispatch, ...), host "
                             "time blocked in CUDA syncs, GPU idle time and what it waited for")
    parser.add_argument("--in-process", action="store_true",
                        help="run every variant in this process (always so on the CPU and under "
                             "torchrun); by default, on one GPU, each variant runs in a child "
                             "process of its own, so that none starts with another's GPU memory")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="further config overrides, e.g. moe.topk=8")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import dataclasses

    import torch

    from moe_lab import config as config_lib
    from moe_lab.bench import hf, mcore
    from moe_lab.bench.report import BenchRow, make_row
    from moe_lab.bench.timing import measure
    from moe_lab.launch.cli import UserError
    from moe_lab.launch.distributed import (check_layout, detect_env, init_distributed,
                                            shutdown_distributed)
    from moe_lab.launch.run import check_transformer_engine

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    # "kind+key=value+...": a variant kind and the overrides of that variant alone
    kinds = {v: v.split("+")[0] for v in variants}
    for kind in kinds.values():
        if kind not in hf.VARIANTS and not mcore.is_variant(kind):
            raise UserError(f"--variants: unknown variant {kind!r}")
    # Under torchrun every rank runs the moe-lab variants in the given layout (e.g.
    # parallel.ep=2), one micro-batch per data-parallel rank; transformers runs on one GPU only.
    env = detect_env()
    if env.world_size > 1 and any(k in hf.VARIANTS for k in kinds.values()):
        raise UserError("--variants: transformers baselines run in a world of one process; "
                        "under torchrun bench mcore_* variants only")
    base = [*mcore.shape_overrides(args.layers, args.seq, args.mbs), "optimizer.warmup_steps=0",
            *args.overrides]
    # Every variant's config is loaded and checked before the first model is built.
    configs = {}
    for v in variants:
        cfg = config_lib.load(args.preset, base + v.split("+")[1:])
        dp = cfg.parallel.data_parallel_size(env.world_size)
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(
            cfg.training, global_batch_size=args.mbs * dp))
        check_layout(cfg, env.world_size)
        configs[v] = cfg
    # One process-group layout for all; overlap_grad_reduce only changes when DDP reduces.
    layouts = {dataclasses.replace(c.parallel, overlap_grad_reduce=False)
               for c in configs.values()}
    if len(layouts) > 1:
        raise UserError("--variants: all variants run in one parallel layout; set parallel.* "
                        "(but overlap_grad_reduce) as a command-line override, not per variant")
    cuda = torch.cuda.is_available()
    if cuda and env.world_size == 1 and len(variants) > 1 and not args.in_process:
        # megatron's DDP hooks its gradient accumulators from C++, which keeps a model and its
        # optimizer alive after use: a second moe-lab variant in one process would start with
        # the first one's ~50 GB.
        rows = [row for v in variants for row in _child_rows(args, v)]
        return _finish(args, rows, torch.cuda.get_device_name(), "")
    if not cuda:
        from moe_lab.compat import enable_cpu_compat

        enable_cpu_compat()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    init_distributed(cfg, env, use_gpu=cuda)
    lead = env.rank == 0
    tokens = args.mbs * args.seq * dp  # per step, all ranks (one layout for all variants)
    peak = args.peak_tflops * env.world_size
    rows = []
    try:
        for variant in variants:
            kind, cfg = kinds[variant], configs[variant]
            module = hf if kind in hf.VARIANTS else mcore
            step = parts = None
            try:
                if module is mcore and cuda:
                    check_transformer_engine(mcore.variant_config(cfg, kind))
                step, parts = module.build_step(cfg, kind, device)
                timing = measure(step, warmup=args.warmup, steps=args.steps)
                flops = config_lib.derive(cfg).flops_per_token
                rows.append(make_row(variant, timing, tokens, flops, peak))
                if args.profile:
                    _profile(args.profile, variant, step, parts[0], timing, env, lead)
            except Exception as err:  # one failing variant must not hide the others' numbers
                rows.append(BenchRow(variant, 0, 0, 0, None, error=str(err).splitlines()[0][:120]))
            finally:
                step = parts = None  # free this model before building the next
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            last = rows[-1]
            if lead:
                print(f"{variant}: " + (f"{last.tokens_per_s:,.0f} tokens/s" if last.error is None
                                        else f"failed: {last.error}"), flush=True)
    finally:
        shutdown_distributed()
    if not lead:
        return 0 if all(r.error is None for r in rows) else 1
    name = torch.cuda.get_device_name() if cuda else "CPU"
    where = f", {env.world_size} ranks ({_layout(cfg)}), MFU per GPU" if env.world_size > 1 else ""
    return _finish(args, rows, name, where, env.world_size)


def _finish(args, rows, device_name: str, where: str, world_size: int = 1) -> int:
    from moe_lab.bench.report import render, to_json

    print(f"\n{args.preset}, {args.layers} layers, seq {args.seq}, mbs {args.mbs}, "
          f"{device_name}{where}")
    print(render(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args) | {"handler": None},
                                              "device": device_name, "world_size": world_size,
                                              "rows": to_json(rows)}, indent=1))
    return 0 if all(r.error is None for r in rows) else 1


def _child_rows(args, variant: str) -> list:
    """Bench one variant in a fresh `moe-lab bench --in-process` child; its row(s)."""
    import subprocess
    import sys
    import tempfile

    from moe_lab.bench.report import BenchRow, from_json

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "moe_lab", "bench", "--in-process", "--preset", args.preset,
               "--layers", str(args.layers), "--seq", str(args.seq), "--mbs", str(args.mbs),
               "--variants", variant, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--peak-tflops", str(args.peak_tflops), "--out", str(out),
               *(["--profile", args.profile] if args.profile else []), *args.overrides]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        # its progress line (and profile), not its one-row table
        print(result.stdout.split(f"\n{args.preset}, {args.layers} layers")[0].strip(), flush=True)
        if out.exists():
            return from_json(json.loads(out.read_text())["rows"])
        return [BenchRow(variant, 0, 0, 0, None, error=f"child process exited {result.returncode}")]


def _profile(folder, variant, step, model, timing, env, lead) -> None:
    from moe_lab.bench import profile

    result = profile.profile_step(step, model)
    name = variant if env.world_size == 1 else f"{variant}_rank{env.rank}"
    profile.write(folder, name, result, timing)  # every rank: the ranks wait on each other
    if lead:
        print(profile.render(name, result, timing), flush=True)


def _layout(cfg) -> str:
    p = cfg.parallel
    return " ".join(f"{k}={getattr(p, k)}" for k in ("tp", "pp", "ep", "etp", "cp")
                    if getattr(p, k) != 1) or "dp"
