"""`moe-lab train CONFIG [--run-dir DIR] [key=value ...]`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train, or resume the run in --run-dir",
        description="Train a model from an experiment config; resume when --run-dir holds a run. "
                    "Multi-process: torchrun --nproc-per-node N -m moe_lab train ... or srun.",
        epilog="examples:\n  moe-lab train experiments/tiny_moe.yaml training.max_steps=50\n"
               "  torchrun --nproc-per-node 2 -m moe_lab train experiments/tiny_moe.yaml "
               "parallel.ep=2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML file or preset name")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. optimizer.lr=1e-3")
    parser.add_argument("--run-dir", help="run directory (default: runs/<config file stem>)")
    parser.add_argument("--stop-at-step", type=int, metavar="N",
                        help="save a checkpoint and exit after step N; the LR schedule still "
                             "follows training.max_steps (like Megatron's --exit-interval)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from moe_lab.launch.run import run_train

    return run_train(args.config, args.overrides, args.run_dir, args.stop_at_step)
