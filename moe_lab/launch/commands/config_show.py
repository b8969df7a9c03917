"""`moe-lab config show CONFIG [key=value ...]`: the resolved config and derived numbers."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    config = subparsers.add_parser(
        "config", help="inspect experiment configs", description="Inspect experiment configs.",
        epilog="example:\n  moe-lab config show experiments/tiny_moe.yaml moe.topk=4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show", help="print the resolved config and derived numbers",
        description="Print the resolved config (base: chain and overrides applied) and the "
                    "numbers derived from it, without building anything.",
        epilog="example: moe-lab config show qwen2-57b-a14b parallel.ep=8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("config", help="experiment YAML file or preset name")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    show.set_defaults(handler=run)


def run(args) -> int:
    from moe_lab import config as config_lib

    from moe_lab.routers import resolve_router

    cfg = config_lib.load(args.config, args.overrides)
    if cfg.moe.enabled:
        resolve_router(cfg.moe.router)  # an unknown router or parameter is a config error too
    print(config_lib.dump(cfg), end="")
    print("# derived")
    for line in config_lib.derive(cfg).as_lines():
        print(f"#   {line}")
    return 0
