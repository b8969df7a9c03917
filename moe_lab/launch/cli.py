"""`moe-lab` / `python -m moe_lab`: the command line.

Subcommands live in `moe_lab.launch.commands`, one module each. A user mistake (bad config, bad
layout, missing file) ends with one line on stderr and exit code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_lab.config import ConfigError
from moe_lab.launch.commands import COMMANDS

EXAMPLES = """examples:
  moe-lab train experiments/tiny_moe.yaml
  moe-lab train experiments/tiny_moe.yaml --run-dir runs/lr3e-3 optimizer.lr=3e-3
  torchrun --nproc-per-node 2 -m moe_lab train experiments/tiny_moe.yaml parallel.ep=2
  moe-lab config show qwen1.5-moe-a2.7b parallel.ep=8
"""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag combination): one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lab", description="Mixture-of-Experts research on megatron-core.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks and library warnings")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moe_lab.launch.commands.{name}").register(subparsers)
    return parser


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
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r".*(Apex|Transformer Engine|absl|non-leaf Tensor).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime"


if __name__ == "__main__":
    sys.exit(main())
