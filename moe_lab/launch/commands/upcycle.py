"""`moe-lab upcycle --from DENSE --to OUT --method {qwen2,granular,sparse} ...`: dense -> MoE.

Every flag is shorthand for a config key (shown in its help), so the same settings can live in
an experiment config's `upcycle:` and `moe:` sections (`--config`); `key=value` overrides work
as for `train`.
"""

from __future__ import annotations

import argparse

# (flag, config key, metavar, help)
FLAGS = [
    ("--method", "upcycle.method", "M", "qwen2, granular or sparse"),
    ("--num-experts", "moe.num_experts", "N", "routed experts per MoE layer"),
    ("--expert-ffn", "moe.expert_ffn", "H_E", "intermediate size of each routed expert"),
    ("--topk", "moe.topk", "K", "routed experts per token"),
    ("--shared-ffn", "moe.shared_expert_ffn", "H_S",
     "shared expert's intermediate size (0: none); cut from the dense FFN"),
    ("--reinit-fraction", "upcycle.reinit_fraction", "F",
     "fraction of each expert re-initialised (default 0.5 for qwen2, else 0)"),
    ("--reinit-granularity", "upcycle.reinit_granularity", "{channel,element}",
     "re-initialise whole channels (gate row, up row, down column) or single elements"),
    ("--router-init", "upcycle.router_init", "{zeros,normal,virtual-group}",
     "router weights (default: virtual-group for granular, normal otherwise)"),
    ("--weight-scale", "upcycle.weight_scale", "auto|FLOAT",
     "scale of the experts' gate/up/down weights (auto: cbrt(N*G/T) or cbrt(G))"),
    ("--shared-gate-init", "upcycle.shared_gate_init", "{zeros,normal}",
     "shared expert gate weight (zeros: the gate starts at exactly 0.5)"),
    ("--seed", "upcycle.seed", "S", "seed of the permutations, re-initialisation and router"),
]

EPILOG = """examples:
  moe-lab upcycle --from runs/tiny_dense --to runs/tiny_qwen2 --method qwen2 \\
      --num-experts 8 --expert-ffn 48 --topk 2 --shared-ffn 128 --seed 0
  moe-lab upcycle --from runs/tiny_dense --to runs/tiny_granular --method granular \\
      --num-experts 8 --expert-ffn 32 --topk 4
  moe-lab upcycle --config experiments/my_moe.yaml --to runs/up moe.router.norm_topk_prob=true
then: moe-lab train runs/tiny_qwen2/upcycled.yaml --run-dir runs/qwen2_continued
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "upcycle", help="initialise a MoE checkpoint from a dense one",
        description="Build a MoE checkpoint from a dense moe-lab checkpoint (Qwen2's method, "
                    "NVIDIA's granular upcycling, or sparse upcycling), with a report of where "
                    "every dense channel went. docs/upcycling.md explains the methods.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="dense", metavar="DENSE",
                        help="dense moe-lab run directory or checkpoint (upcycle.source)")
    parser.add_argument("--to", dest="out", metavar="OUT", required=True,
                        help="new directory for the MoE checkpoint, upcycled.yaml and the report")
    parser.add_argument("--config", metavar="CONFIG",
                        help="MoE experiment config (default: the dense run's config)")
    for flag, key, metavar, text in FLAGS:
        parser.add_argument(flag, dest=key, metavar=metavar, help=f"{text} ({key})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. moe.router.norm_topk_prob=true")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from moe_lab.launch.upcycle import run_upcycle

    flags = [f"{key}={getattr(args, key)}" for _, key, _, _ in FLAGS
             if getattr(args, key) is not None]
    return run_upcycle(args.config, args.dense, args.out, [*flags, *args.overrides])
