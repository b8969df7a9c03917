"""`moe-lab` / `python -m moe_lab`: the command line.

A user mistake (bad config, bad layout, missing file) ends with one line on stderr and exit code
2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from moe_lab.config import ConfigError

EXAMPLES = """examples:
  moe-lab train experiments/tiny_moe.yaml
  moe-lab train experiments/tiny_moe.yaml --run-dir runs/lr3e-3 optimizer.lr=3e-3
  torchrun --nproc-per-node 2 -m moe_lab train experiments/tiny_moe.yaml parallel.ep=2
  moe-lab config show qwen1.5-moe-a2.7b parallel.ep=8
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lab", description="Mixture-of-Experts research on megatron-core.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks and library warnings")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train, or resume the run in --run-dir",
        description="Train a model from an experiment config; resume when --run-dir holds a run.",
        epilog="example: moe-lab train experiments/tiny_moe.yaml training.max_steps=50",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="experiment YAML file or preset name")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. optimizer.lr=1e-3")
    train.add_argument("--run-dir", help="run directory (default: runs/<config file stem>)")
    train.add_argument("--stop-at-step", type=int, metavar="N",
                       help="save a checkpoint and exit after step N; the LR schedule still "
                            "follows training.max_steps (like Megatron's --exit-interval)")

    config = commands.add_parser("config", help="inspect experiment configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser(
        "show", help="print the resolved config and derived numbers",
        description="Print the resolved config (base: chain and overrides applied) and the "
                    "numbers derived from it, without building anything.",
        epilog="example: moe-lab config show qwen2-57b-a14b parallel.ep=8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("config", help="experiment YAML file or preset name")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
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
        if args.command == "train":
            from moe_lab.launch.run import run_train

            return run_train(args.config, args.overrides, args.run_dir, args.stop_at_step)
        if args.command == "config":
            return _config_show(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"moe-lab: error: {err}", file=sys.stderr)
        return 2
    return 0


def _config_show(path: str, overrides: list[str]) -> int:
    from moe_lab import config as config_lib

    cfg = config_lib.load(path, overrides)
    print(config_lib.dump(cfg), end="")
    print("# derived")
    for line in config_lib.derive(cfg).as_lines():
        print(f"#   {line}")
    return 0


def _quiet_libraries() -> None:
    """megatron-core warns about every optional dependency it cannot find (apex, TE, ...)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*(Apex|Transformer Engine|absl).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
