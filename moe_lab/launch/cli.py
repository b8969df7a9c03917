"""`moe-lab` / `python -m moe_lab`: the command line.

Subcommands live in `moe_lab.launch.commands`, one module each. A user mistake (bad config, bad
layout, missing file) ends with one line on stderr and exit code 2; `--debug` shows the
traceback instead. `--debug` and `--quiet` are accepted before or after the command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moe_lab.config import ConfigError
from moe_lab.launch.commands import COMMANDS

EXAMPLES = """examples:
  bash scripts/demo.sh      # set up, then a 3-router ablation on the built-in corpus, compared
  moe-lab sweep experiments/router_ablation_small.yaml && moe-lab compare router_ablation_small
  moe-lab train experiments/tiny_moe.yaml
  moe-lab train experiments/tiny_moe.yaml --run-dir runs/lr3e-3 optimizer.lr=3e-3
  torchrun --nproc-per-node 2 -m moe_lab train experiments/tiny_moe.yaml parallel.ep=2
  moe-lab config show qwen1.5-moe-a2.7b parallel.ep=8
  moe-lab data builtin --out data/builtin && moe-lab train experiments/tiny_moe_builtin.yaml
  moe-lab eval runs/tiny_moe_builtin --data data/builtin/text
"""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag combination): one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lab", description="Mixture-of-Experts research on megatron-core.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global_flags(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moe_lab.launch.commands.{name}").register(subparsers)
    for command in _all_subparsers(parser):
        # SUPPRESS: a subcommand without the flag must not reset the value given before it.
        _add_global_flags(command, default=argparse.SUPPRESS)
    return parser


def _add_global_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show Python tracebacks and library warnings")
    parser.add_argument("--quiet", action="store_true", default=default,
                        help="no per-step progress lines (for Slurm logs); results and errors "
                             "still print (same as MOE_LAB_QUIET=1)")


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases repeat a parser
                found += [sub, *_all_subparsers(sub)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`train X --run-dir D a.b=1`), which argparse's
    # positional nargs="*" does not collect: gather them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.quiet:
        os.environ["MOE_LAB_QUIET"] = "1"  # inherited by the processes a sweep starts
    if not args.debug:
        _quiet_libraries()
    try:
        return args.handler(args)
    except (ConfigError, UserError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"moe-lab: error: {err}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """megatron-core warns about every optional dependency it cannot find (apex, TE, ...)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\..*")
    # torch.distributed.checkpoint on its own process (upcycle, convert, eval): expected there.
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*ShardedTensor.*")
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r".*(Apex|Transformer Engine|absl|non-leaf Tensor).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    # "No CUDA runtime is found" on every CPU start: true, and not the user's concern.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
