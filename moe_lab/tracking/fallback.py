"""What a run sends to MLflow, as records; and the local journal of the records MLflow missed.

A record is a small dict (`op`: metrics, params, tags, text, artifact, status). `apply()` sends
one to a run; the sink uses it while the store answers, and after the first failure appends the
records to RUN_DIR/mlflow_offline.jsonl instead. `sync()` (`moe-lab tracking sync RUN_DIR`)
replays that journal into the same run (creating it when training never reached the store) and
then archives the journal, so nothing is sent twice by a second sync.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from moe_lab.tracking import store

JOURNAL = "mlflow_offline.jsonl"
RUN_ID_FILE = "mlflow_run_id"
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def apply(client, run_id: str, record: dict) -> int:
    """Send one record to the run; returns the number of requests it took."""
    op = record["op"]
    if op == "metrics":
        metrics = [store.Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        return store.log_batch(client, run_id, metrics=metrics)
    if op == "params":
        params = [store.Param(k, v) for k, v in record["params"].items()]
        return store.log_batch(client, run_id, params=params)
    if op == "tags":
        tags = [store.RunTag(k, str(v)) for k, v in record["tags"].items()]
        return store.log_batch(client, run_id, tags=tags)
    if op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
        return 1
    if op == "artifact":
        client.log_artifact(run_id, record["path"], record.get("artifact_path"))
        return 1
    if op == "status":
        if record["status"] in TERMINAL:
            client.set_terminated(run_id, record["status"])
        else:
            client.update_run(run_id, record["status"])
        return 1
    raise ValueError(f"{JOURNAL}: unknown record op {op!r}")


class Journal:
    """RUN_DIR/mlflow_offline.jsonl. The first line (op "run") says which store and run it is for,
    and holds what creating the run needs when the store was never reached."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / JOURNAL

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def archive(self) -> Path:
        """Keep the synced journal under another name (never delete what was recorded)."""
        target = self.path.with_name(f"mlflow_offline.synced-{time.strftime('%Y%m%d-%H%M%S')}"
                                     f"-{time.time_ns() % 10**6:06d}.jsonl")
        self.path.rename(target)
        return target


def read_run_id(run_dir: Path) -> str | None:
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def write_run_id(run_dir: Path, run_id: str) -> None:
    path = Path(run_dir) / RUN_ID_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)


def sync(run_dir: Path, client, uri: str) -> tuple[str, int, int]:
    """Replay RUN_DIR's journal into its run. Returns (run_id, records, metric values)."""
    journal = Journal(run_dir)
    records = journal.records()
    header, body = records[0], records[1:]
    run_id = header.get("run_id") or read_run_id(run_dir)
    if run_id is None:
        run_id = create_run(client, uri, header)
        write_run_id(run_dir, run_id)
    values = 0
    for record in _coalesce(body):
        if record["op"] == "artifact" and not Path(record["path"]).is_file():
            continue  # removed since; the other records still matter
        apply(client, run_id, record)
        values += len(record.get("metrics", ()))
    journal.archive()
    return run_id, len(body), values


def create_run(client, uri: str, header: dict) -> str:
    """The run a journal's header describes: experiment, name, tags (parent included), params."""
    experiment = store.experiment_id(client, uri, header["experiment"])
    run = client.create_run(experiment, run_name=header["run_name"], tags=header["tags"])
    apply(client, run.info.run_id, {"op": "params", "params": header["params"]})
    return run.info.run_id


def _coalesce(records: list[dict]):
    """Consecutive metric records become one (sent in as few 1000-value requests as possible)."""
    pending: list = []
    for record in records:
        if record["op"] == "metrics":
            pending.extend(record["metrics"])
            continue
        if pending:
            yield {"op": "metrics", "metrics": pending}
            pending = []
        yield record
    if pending:
        yield {"op": "metrics", "metrics": pending}
