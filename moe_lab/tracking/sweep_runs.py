"""A sweep in MLflow: its parent run, and which members have finished.

`ensure_parent_run` finds the sweep's parent run by its tags or creates it, before any member
starts; each member then logs into a child run (tracking.parent_run_id, set by `moe-lab sweep`).
A member is finished when its MLflow run (RUN_DIR/mlflow_run_id) is FINISHED and has logged
`loss` at training.max_steps; without MLflow (tracking off, no run id yet, store unreachable) when
its latest checkpoint (RUN_DIR/checkpoints/latest) is at max_steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_lab.config import ExperimentConfig
from moe_lab.tracking import store as mlflow_store

# Members' runs carry `sweep_id` and `mlflow.parentRunId` (set by the MLflow sink from
# tracking.sweep_id / tracking.parent_run_id); the parent carries the same `sweep_id`.
TAG_SWEEP_ID = "sweep_id"
TAG_SWEEP_NAME = "sweep_name"
TAG_ROLE = "sweep_role"
PARENT_ROLE = "parent"


@dataclass(frozen=True)
class Store:
    """Where a sweep's runs live: tracking URI and experiment."""

    uri: str
    experiment: str


def store_for(cfg: ExperimentConfig, experiment: str, cwd: Path) -> Store:
    """The same store the members' runs will use: tracking.uri, else <cwd>/mlruns.db."""
    return Store(mlflow_store.resolve_uri(cfg.tracking.uri, Path(cwd)), experiment)


def ensure_parent_run(store: Store, sweep_id: str, sweep_name: str, description: dict) -> str:
    """The id of the sweep's parent run: found by its tags, else created (status RUNNING)."""
    client = _client(store.uri)
    experiment_id = mlflow_store.experiment_id(client, store.uri, store.experiment)
    found = client.search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
        filter_string=f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{TAG_ROLE}` = "
                      f"'{PARENT_ROLE}'")
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=sweep_name, tags={
        TAG_SWEEP_ID: sweep_id, TAG_SWEEP_NAME: sweep_name, TAG_ROLE: PARENT_ROLE})
    client.log_dict(run.info.run_id, description, "sweep.json")
    return run.info.run_id


def finish_parent_run(store: Store, run_id: str) -> None:
    """Mark the sweep's parent run FINISHED (called once every member has finished)."""
    _client(store.uri).set_terminated(run_id, "FINISHED")


def finished(members: list[tuple[Path, int, bool]], store: Store | None) -> list[bool]:
    """For each (run_dir, max_steps, tracked): has the member reached max_steps? Judged by its
    MLflow run when tracked and recorded in RUN_DIR/mlflow_run_id, else by its checkpoint; after
    one failed MLflow request, by checkpoints only (a dead server is asked once, not per member)."""
    results = []
    for run_dir, max_steps, tracked in members:
        run_id_file = Path(run_dir) / "mlflow_run_id"
        if store is not None and tracked and run_id_file.is_file():
            try:
                results.append(_mlflow_finished(store.uri, run_id_file.read_text().strip(),
                                                max_steps))
                continue
            except Exception as err:  # noqa: BLE001 - any MLflow failure: use the checkpoints
                print(f"MLflow at {store.uri} did not answer ({type(err).__name__}): judging "
                      f"members by their checkpoints", flush=True)
                store = None
        results.append(checkpoint_step(run_dir) >= max_steps)
    return results


def checkpoint_step(run_dir: Path) -> int:
    """The step of RUN_DIR/checkpoints/latest (the run-directory contract in interfaces.md);
    0 without one. Read directly: judging a sweep should not need torch."""
    marker = Path(run_dir) / "checkpoints" / "latest"
    name = marker.read_text().strip() if marker.is_file() else ""
    digits = name.rpartition("_")[2]
    if not (digits.isdigit() and (marker.parent / name).is_dir()):
        return 0
    return int(digits)


def _mlflow_finished(uri: str, run_id: str, max_steps: int) -> bool:
    client = _client(uri)
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        return False
    history = client.get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=0) >= max_steps


def _client(uri: str):
    return mlflow_store.MlflowClient(tracking_uri=uri)
