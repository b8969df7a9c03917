"""`moe-lab convert hf-to-mcore HF_DIR OUT` and `moe-lab convert mcore-to-hf CKPT OUT_DIR`.

Everything is checked (plan_*) before a process group starts or a file is written; a bad input
ends in one line naming the tensor, file or key. hf-to-mcore runs on every rank of `--layout`
(torchrun for more than one process); mcore-to-hf runs in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math

from moe_lab.launch.cli import UserError

IMPORT_EPILOG = """examples:
  moe-lab convert hf-to-mcore ~/models/Qwen1.5-MoE-A2.7B ckpt/qwen-moe
  torchrun --nproc-per-node 4 -m moe_lab convert hf-to-mcore ~/models/Qwen2-57B-A14B \\
      ckpt/qwen2-57b --layout tp=2,ep=2
  moe-lab train ckpt/qwen-moe/config.yaml --run-dir runs/continue training.max_steps=1000
"""
EXPORT_EPILOG = """examples:
  moe-lab convert mcore-to-hf runs/continue hf/continue
  moe-lab convert mcore-to-hf runs/a/checkpoints/step_0000500 hf/a500 --dtype bfloat16 \\
      --max-shard-size 2GB
"""


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints between Hugging Face and moe-lab (megatron)",
        description="Convert Qwen2 / Qwen2-MoE checkpoints between Hugging Face safetensors "
                    "and moe-lab's megatron dist checkpoints (docs/conversion.md).",
        epilog="examples:\n  moe-lab convert hf-to-mcore ~/models/Qwen1.5-MoE-A2.7B ckpt/qwen-moe\n"
               "  moe-lab convert mcore-to-hf runs/continue hf/continue",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = convert.add_subparsers(dest="convert_command", required=True, metavar="DIRECTION")

    hf_in = actions.add_parser(
        "hf-to-mcore", help="import a Hugging Face model directory",
        description="Import Qwen2ForCausalLM / Qwen2MoeForCausalLM (config.json + safetensors) "
                    "into OUT: a weights-only megatron checkpoint loadable in any layout, the "
                    "matching experiment config (OUT/config.yaml) and the source's tokenizer.",
        epilog=IMPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    hf_in.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory")
    hf_in.add_argument("out", metavar="OUT", help="new output directory")
    hf_in.add_argument("--layout", metavar="tp=N,pp=N,ep=N,etp=N",
                       help="parallel layout to convert in (one process per rank under "
                            "torchrun; each holds only its shard); also written to the config")
    hf_in.set_defaults(handler=run_hf_to_mcore)

    hf_out = actions.add_parser(
        "mcore-to-hf", help="export a moe-lab checkpoint to a Hugging Face directory",
        description="Export a moe-lab checkpoint (run directory or checkpoint directory) to a "
                    "directory that transformers.AutoModelForCausalLM.from_pretrained loads.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    hf_out.add_argument("ckpt", metavar="CKPT", help="run directory or checkpoint directory")
    hf_out.add_argument("out", metavar="OUT_DIR", help="new output directory")
    hf_out.add_argument("--config", help="experiment config of the checkpoint (default: the "
                                         "run directory's config.yaml)")
    hf_out.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype to write (default: the checkpoint's)")
    hf_out.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file, e.g. 5GB, 500MB (default: 5GB)")
    hf_out.add_argument("--hf-template", metavar="DIR",
                        help="HF directory whose tokenizer files, token ids and context length "
                             "to keep (default: the one the model was imported from, if known)")
    hf_out.set_defaults(handler=run_mcore_to_hf)


def run_hf_to_mcore(args) -> int:
    from moe_lab import convert
    from moe_lab.launch.distributed import check_layout, detect_env

    env = detect_env()
    with _user_errors():
        plan = convert.plan_import(args.hf_dir, args.out, convert.parse_layout(args.layout))
    p = plan.cfg.parallel
    ranks = math.lcm(p.tp * p.pp * p.cp, p.ep * p.etp * p.pp)
    if env.world_size % ranks:
        raise UserError(f"--layout {args.layout} needs a multiple of {ranks} processes, not "
                        f"{env.world_size}: torchrun --nproc-per-node {ranks} -m moe_lab "
                        "convert hf-to-mcore ...")
    check_layout(plan.cfg, env.world_size)
    use_gpu = _start(plan.cfg, env)
    try:
        with _user_errors():
            result = convert.write_import(plan, use_gpu)
    finally:
        _stop()
    if env.rank == 0:
        print(f"imported {plan.hf_dir} ({plan.family.architecture}, {len(plan.maps)} tensors "
              f"mapped, {plan.total_bytes / 1e6:,.1f} MB) -> {plan.out} in layout "
              f"{plan.cfg.parallel.describe()} ({result['seconds']:.1f} s)\n"
              f"train from it: moe-lab train {plan.out / 'config.yaml'} --run-dir runs/NAME")
    return 0


def run_mcore_to_hf(args) -> int:
    from moe_lab import convert
    from moe_lab.config import ParallelConfig
    from moe_lab.convert.hf_files import parse_size
    from moe_lab.launch.distributed import detect_env

    env = detect_env()
    if env.world_size > 1:
        raise UserError("convert mcore-to-hf runs in one process (it reads any layout); "
                        "start it without torchrun/srun")
    with _user_errors():
        max_shard = parse_size(args.max_shard_size)
        plan = convert.plan_export(args.ckpt, args.out, args.config, args.dtype, args.hf_template)
    # dist_checkpointing reads through torch.distributed: a world of one, whatever the
    # layout the checkpoint was written in.
    _start(dataclasses.replace(plan.cfg, parallel=ParallelConfig()), env)
    try:
        with _user_errors():
            result = convert.write_export(plan, max_shard)
    finally:
        _stop()
    print(f"exported {plan.checkpoint} ({plan.family.architecture}, {len(plan.maps)} tensors "
          f"mapped, {result['bytes'] / 1e6:,.1f} MB {plan.dtype}) -> {plan.out}: "
          f"{', '.join(result['files'])}"
          + (f"; with {', '.join(result['assets'])} from {plan.template}" if result["assets"]
             else "") + f" ({result['seconds']:.1f} s)")
    return 0


@contextlib.contextmanager
def _user_errors():
    """ConversionError -> the CLI's one-line UserError."""
    from moe_lab.convert import ConversionError

    try:
        yield
    except ConversionError as err:
        raise UserError(str(err)) from None


def _start(cfg, env) -> bool:
    import torch

    from moe_lab.launch.distributed import init_distributed

    use_gpu = torch.cuda.is_available()
    if not use_gpu:
        from moe_lab.compat import enable_cpu_compat

        enable_cpu_compat()
    init_distributed(cfg, env, use_gpu)
    return use_gpu


def _stop() -> None:
    from moe_lab.launch.distributed import shutdown_distributed

    shutdown_distributed()
