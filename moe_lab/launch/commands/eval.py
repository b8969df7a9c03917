"""`moe-lab eval CKPT_OR_RUN_DIR [--data PREFIX ...] [key=value ...]`: validation loss and
perplexity of a checkpoint."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="validation loss and perplexity of a checkpoint",
        description="Evaluate a checkpoint (a run directory's latest, or a given "
                    "checkpoints/step_NNNNNNN) on the held-out set: the valid split of the "
                    "run's data.blend, or of each --data prefix. Overrides apply to the run's "
                    "config.yaml (e.g. data.valid_samples=256).",
        epilog="examples:\n  moe-lab eval runs/tiny_moe_builtin\n"
               "  moe-lab eval runs/a/checkpoints/step_0000100 --data data/builtin/text "
               "--data data/builtin/code data.valid_samples=128",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", metavar="CKPT_OR_RUN_DIR",
                        help="a run directory or one of its checkpoints")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the run's config")
    parser.add_argument("--data", action="append", metavar="PREFIX",
                        help="evaluate on this dataset's valid split instead; repeat for more")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per dataset instead of a table")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from moe_lab.launch.evaluate import run_eval

    for result in run_eval(args.target, args.data, args.overrides):
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['data']}: valid/loss {result['loss']:.4f}  perplexity "
                  f"{result['perplexity']:.2f}  ({result['samples']} samples, "
                  f"{result['tokens']:,} tokens)")
    return 0
