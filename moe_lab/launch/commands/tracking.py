"""`moe-lab tracking sync RUN_DIR [--uri URI]`: upload what a run kept while MLflow was away."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    tracking = subparsers.add_parser(
        "tracking", help="MLflow tracking chores", description="MLflow tracking chores.",
        epilog="example:\n  moe-lab tracking sync runs/tiny_moe    # upload what a run kept "
               "while MLflow was away",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = tracking.add_subparsers(dest="tracking_command", required=True, metavar="ACTION")
    sync = actions.add_parser(
        "sync", help="upload RUN_DIR/mlflow_offline.jsonl to the run's MLflow store",
        description="Replay the records a run kept in RUN_DIR/mlflow_offline.jsonl while its\n"
                    "tracking store did not answer into the same MLflow run (created now if\n"
                    "training never reached the store). The journal is kept, renamed\n"
                    "mlflow_offline.synced-<time>.jsonl.",
        epilog="examples:\n  moe-lab tracking sync runs/tiny_moe\n"
               "  moe-lab tracking sync runs/tiny_moe --uri http://mlflow.internal:5000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sync.add_argument("run_dir", help="run directory holding mlflow_offline.jsonl")
    sync.add_argument("--uri", help="store to upload to (default: the one the run was logging to)")
    sync.set_defaults(handler=run_sync)


def run_sync(args) -> int:
    from moe_lab.launch.cli import UserError
    from moe_lab.tracking import fallback, store

    journal = fallback.Journal(Path(args.run_dir))
    if not journal.exists():
        raise UserError(f"{journal.path}: no offline MLflow records to sync (nothing was missed, "
                        f"or it was synced already)")
    uri = store.resolve_uri(args.uri or journal.records()[0]["uri"])
    if not store.reachable(uri):
        raise UserError(f"--uri: {uri} does not answer; start it or pass another store")
    run_id, records, values = fallback.sync(Path(args.run_dir), store.MlflowClient(uri), uri)
    print(f"synced {records} records ({values} metric values) into run {run_id} at {uri}")
    return 0
