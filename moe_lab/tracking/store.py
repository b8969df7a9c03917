"""The MLflow store a run talks to: where it is, the client for it, requests in MLflow's limits.

Every moe-lab module that needs mlflow imports it through here, so telemetry is off before mlflow
is first imported. Default store without a server: `sqlite:///<cwd>/mlruns.db`, artifacts in
`<cwd>/mlartifacts` (for any sqlite store: `mlartifacts/` next to the database file).
"""

from __future__ import annotations

import logging
import os
import re
import urllib.request
from itertools import islice
from pathlib import Path

# MLflow 3 reports usage to a remote endpoint by default; moe-lab never lets it (and clusters
# often allow loopback or the team server only).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
# A training run must not stall for minutes when the server is gone (MLflow retries 7 times with
# exponential backoff by default): fail fast, then the sink switches to its local fallback.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# Progress bars per downloaded artifact would bury `moe-lab compare`'s table.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

# "Creating initial MLflow database tables..." and alembic's migration lines on every new store.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# MLflow's limits on one log_batch request.
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
DEFAULT_EXPERIMENT = "moe-lab"

__all__ = ["MAX_METRICS", "MAX_PARAMS", "MAX_TAGS", "Metric", "MlflowClient", "Param", "RunTag",
           "artifact_root", "chunks", "default_uri", "experiment_id", "is_server", "log_batch",
           "mlflow", "reachable", "resolve_uri"]


def default_uri(cwd: Path | None = None) -> str:
    return f"sqlite:///{Path(cwd or Path.cwd()).resolve() / 'mlruns.db'}"


def resolve_uri(uri: str | None, cwd: Path | None = None) -> str:
    """tracking.uri, or the default store in cwd. A bare path means a sqlite file."""
    if not uri:
        return default_uri(cwd)
    if "://" not in uri and not uri.startswith("sqlite:"):
        return f"sqlite:///{(Path(cwd or Path.cwd()) / uri).resolve()}"
    return uri


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_root(uri: str) -> Path | None:
    """Where a sqlite store keeps artifacts (beside the database); None for servers."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).parent / "mlartifacts"


def reachable(uri: str, timeout: float = 5.0) -> bool:
    """A local store always is; a server when its /health answers."""
    if not is_server(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            return reply.status == 200
    except OSError:
        return False


def experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The experiment's id, creating it (artifacts under the store's mlartifacts/) if needed."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = artifact_root(uri)
    location = (root / _safe_name(name)).as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process (a sweep member) created it in the meantime.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def chunks(items, size: int):
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def log_batch(client: MlflowClient, run_id: str, metrics=(), params=(), tags=()) -> int:
    """Send everything in as few log_batch requests as MLflow's limits allow; returns requests."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    requests = 0
    for batch in chunks(params, MAX_PARAMS):
        client.log_batch(run_id, params=batch, synchronous=True)
        requests += 1
    for batch in chunks(tags, MAX_TAGS):
        client.log_batch(run_id, tags=batch, synchronous=True)
        requests += 1
    for batch in chunks(metrics, MAX_METRICS):
        client.log_batch(run_id, metrics=batch, synchronous=True)
        requests += 1
    return requests


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"
