"""What `moe-lab compare` compares: the runs of an experiment or the children of a sweep's parent
run, each with its params, metric histories and latest expert-load matrix, read through MLflow's
search API, metric histories and artifact downloads."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field

import numpy as np

from moe_lab.tracking import store

IMBALANCE = "moe/load_max_over_mean"  # the mean over MoE layers of moe/layer_NN/load_max_over_mean
_LAYER_IMBALANCE = re.compile(r"moe/layer_(\d+)/load_max_over_mean")
# Params that differ between any two runs but say nothing about the experiment.
_NOT_COMPARED = re.compile(r"^(derived\.)")


class NothingToCompare(LookupError):
    """The target names no experiment or parent run with runs in it."""


@dataclass
class RunSeries:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    load: np.ndarray | None = None  # latest [moe_layers, experts] token counts
    load_step: int | None = None
    load_layers: list[int] = field(default_factory=list)

    def final(self, key: str) -> float | None:
        points = self.curves.get(key)
        return points[-1][1] if points else None

    def last_step(self) -> int | None:
        steps = [points[-1][0] for points in self.curves.values() if points]
        return max(steps) if steps else None


@dataclass
class Comparison:
    title: str
    uri: str
    metric: str
    runs: list[RunSeries]
    varied: list[str]  # the param keys whose values differ between the runs
    experiment_id: str

    @property
    def valid_metric(self) -> str:
        return self.metric if self.metric.startswith("valid/") else f"valid/{self.metric}"


def gather(client, uri: str, target: str, metric: str = "loss") -> Comparison:
    title, experiment_id, runs = find_runs(client, target)
    series = [_series(client, run, metric) for run in runs]
    _unique_names(series)
    return Comparison(title=title, uri=uri, metric=metric, runs=series,
                      varied=varied_params([s.params for s in series]),
                      experiment_id=experiment_id)


def find_runs(client, target: str):
    """(title, experiment id, runs oldest first) for a parent run id, an experiment name or id,
    or a parent run's name."""
    parent = _run_or_none(client, target) if re.fullmatch(r"[0-9a-f]{32}", target) else None
    if parent is not None:
        children = _children(client, parent)
        if not children:
            raise NothingToCompare(f"{target}: run {parent.info.run_name} has no child runs")
        return f"sweep {parent.info.run_name}", parent.info.experiment_id, children
    experiment = client.get_experiment_by_name(target)
    if experiment is None and target.isdigit():
        experiment = _experiment_or_none(client, target)
    if experiment is not None:
        runs = _search(client, [experiment.experiment_id])
        parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
        runs = [r for r in runs if r.info.run_id not in parents]
        if not runs:
            raise NothingToCompare(f"{target}: experiment has no runs")
        return f"experiment {experiment.name}", experiment.experiment_id, runs
    ids = [e.experiment_id for e in client.search_experiments()]
    for parent in reversed(_search(client, ids, f"attributes.run_name = '{_quote(target)}'")):
        children = _children(client, parent)
        if children:
            return f"sweep {target}", parent.info.experiment_id, children
    raise NothingToCompare(f"{target}: no experiment, parent run id or parent run name of that "
                           f"name in the store")


def varied_params(params: list[dict[str, str]]) -> list[str]:
    keys = sorted({k for p in params for k in p if not _NOT_COMPARED.match(k)})
    return [k for k in keys if len({p.get(k) for p in params}) > 1]


def _series(client, run, metric: str) -> RunSeries:
    run_id = run.info.run_id
    series = RunSeries(run_id=run_id, name=run.info.run_name or run_id[:8],
                       status=run.info.status, params=dict(run.data.params))
    keys = set(run.data.metrics)
    valid = metric if metric.startswith("valid/") else f"valid/{metric}"
    for key in (metric, valid):
        if key in keys:
            series.curves[key] = _history(client, run_id, key)
    layers = sorted(k for k in keys if _LAYER_IMBALANCE.fullmatch(k))
    if layers:
        series.curves[IMBALANCE] = _mean_over_layers(
            [_history(client, run_id, k) for k in layers])
    _latest_load(client, run, series)
    return series


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) by step; a step logged twice (a resumed run) keeps its latest value."""
    by_step = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        by_step[m.step] = m.value
    return sorted(by_step.items())


def _mean_over_layers(histories: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    per_step: dict[int, list[float]] = {}
    for history in histories:
        for step, value in history:
            per_step.setdefault(step, []).append(value)
    return [(s, float(np.mean(v))) for s, v in sorted(per_step.items())
            if len(v) == len(histories)]


def _latest_load(client, run, series: RunSeries) -> None:
    files = [f.path for f in client.list_artifacts(run.info.run_id, "expert_load")
             if f.path.endswith(".npy")]
    if not files:
        return
    latest = max(files)  # step_NNNNNNN: zero-padded, so the largest name is the latest step
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run.info.run_id, latest, tmp)
        series.load = np.load(local)
    series.load_step = int(re.search(r"step_(\d+)", latest).group(1))
    layers = run.data.tags.get("moe.layer_numbers", "")
    series.load_layers = [int(n) for n in layers.split(",") if n.strip().isdigit()]


def _children(client, parent) -> list:
    return _search(client, [parent.info.experiment_id],
                   f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def _search(client, experiment_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _run_or_none(client, run_id: str):
    try:
        return client.get_run(run_id)
    except store.mlflow.exceptions.MlflowException:
        return None


def _experiment_or_none(client, experiment_id: str):
    try:
        return client.get_experiment(experiment_id)
    except store.mlflow.exceptions.MlflowException:
        return None


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _unique_names(series: list[RunSeries]) -> None:
    """Two runs of one name get their id's first characters appended."""
    names = [s.name for s in series]
    for s in series:
        if names.count(s.name) > 1:
            s.name = f"{s.name} ({s.run_id[:6]})"
