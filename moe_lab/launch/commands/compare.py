"""`moe-lab compare EXPERIMENT_OR_PARENT_RUN [--metric loss] [--out DIR]`: a comparison report."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="HTML report + markdown table comparing an experiment's or sweep's runs",
        description="Compare the runs of an MLflow experiment, or the child runs of a sweep's\n"
                    "parent run (by run id or name): loss and validation-loss curves,\n"
                    "load-imbalance curves, a final-value table with the varied params as\n"
                    "columns and the expert-load heatmaps side by side, as one self-contained\n"
                    "HTML file plus PNGs in --out. The table also goes to stdout as markdown.",
        epilog="examples:\n  moe-lab compare router_ablation\n"
               "  moe-lab compare 3f2c9a...e1 --metric loss/lm --out reports/routers\n"
               "  moe-lab compare moe-lab --uri http://127.0.0.1:5000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", metavar="EXPERIMENT_OR_PARENT_RUN",
                        help="experiment name or id, or a parent run's id or name")
    parser.add_argument("--metric", default="loss",
                        help="training metric to plot and tabulate (default: loss; its "
                             "validation curve is valid/<metric>)")
    parser.add_argument("--out", help="output directory (default: compare/<target>)")
    parser.add_argument("--uri", help="tracking store (default: sqlite:///<cwd>/mlruns.db)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from moe_lab.launch.cli import UserError
    from moe_lab.tracking import report, store
    from moe_lab.tracking.compare import NothingToCompare, gather

    uri = store.resolve_uri(args.uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"--uri: {uri} does not exist (run moe-lab train here first, or pass "
                        f"--uri)")
    if not store.reachable(uri):
        raise UserError(f"--uri: {uri} does not answer")
    try:
        comparison = gather(store.MlflowClient(uri), uri, args.target, args.metric)
    except NothingToCompare as err:
        raise UserError(str(err)) from None
    out = Path(args.out or Path("compare") / re.sub(r"[^A-Za-z0-9._-]+", "_", args.target))
    page = report.write(comparison, out)
    print(report.markdown_table(comparison), end="")
    print(f"report: {page}", file=sys.stderr)
    return 0
