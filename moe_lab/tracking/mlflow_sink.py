"""The MLflow sink: rank 0's MLflow run for one run directory.

At start: the run is created (or, when RUN_DIR/mlflow_run_id exists, resumed) with the flattened
config as params, the tags launch/ passes in (git, host, GPUs, layout, Slurm ids), the parent and
sweep tags of a sweep member, and the resolved config as `config.yaml`. During training, metrics
are buffered and sent with log_batch (at most 1000 values a request) every FLUSH_SECONDS; the
expert-load matrix goes up as .npy + heatmap every tracking.expert_load_interval steps; the latest
checkpoint's path is a tag. At the end: the checkpoint list as `checkpoints.txt`, and the status
(FINISHED only when training reached training.max_steps).

If the store stops answering, training goes on: the sink says so once and writes everything
still to send to RUN_DIR/mlflow_offline.jsonl (`moe-lab tracking sync RUN_DIR` uploads it; the
next `train` on the run directory does too when the store is back).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from moe_lab import config as config_lib
from moe_lab.config import ConfigError, ExperimentConfig
from moe_lab.tracking import expert_load, fallback, store
from moe_lab.tracking.params import run_params
from moe_lab.train.checkpoint import checkpoint_dir, latest_checkpoint

FLUSH_SECONDS = 10.0
# Keys of the loop's metrics dict that are not worth a history.
_NOT_LOGGED = ("eta_s",)


class MlflowSink:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, tags: dict[str, str],
                 stream=sys.stdout, warnings=sys.stderr):
        t = cfg.tracking
        self.run_dir = Path(run_dir)
        self.uri = store.resolve_uri(t.uri)
        self.max_steps = cfg.training.max_steps
        self.load_interval = t.expert_load_interval
        pattern = cfg.moe.moe_layers(cfg.model.num_layers)
        self.moe_layer_numbers = [i for i, is_moe in enumerate(pattern) if is_moe]
        self.stream, self.warnings = stream, warnings
        self.journal = fallback.Journal(self.run_dir)
        self.client = None
        self.run_id = fallback.read_run_id(self.run_dir)
        self.requests = self.values = 0
        self.busy_s = 0.0
        self._buffer: list[list] = []
        self._last_flush = time.perf_counter()
        self._started = None
        self._last_step = 0
        self._status = None  # set by fail()
        self._checkpoint = None
        self._closed = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._open(cfg, {**_run_tags(cfg, self.run_dir), **tags})

    # -- start -------------------------------------------------------------------------------

    def _open(self, cfg: ExperimentConfig, tags: dict[str, str]) -> None:
        params = run_params(cfg)
        experiment = cfg.tracking.experiment or store.DEFAULT_EXPERIMENT
        run_name = cfg.tracking.run_name or self.run_dir.resolve().name
        if store.reachable(self.uri):
            try:
                self.client = store.MlflowClient(self.uri)
                if self.journal.exists():
                    self._sync_journal()
                self._start_run(experiment, run_name, tags, params)
            except ConfigError:
                raise
            except Exception as err:  # the store broke while starting: as if it were down
                self._go_offline(err)
        else:
            self._go_offline(f"{self.uri} does not answer")
        if self.client is None and not self.journal.exists():
            self.journal.append({"op": "run", "uri": self.uri, "run_id": self.run_id,
                                 "experiment": experiment, "run_name": run_name, "tags": tags,
                                 "params": params})
        self._send({"op": "text", "text": config_lib.dump(cfg), "artifact_file": "config.yaml"})

    def _sync_journal(self) -> None:
        run_id, records, values = fallback.sync(self.run_dir, self.client, self.uri)
        self.run_id = run_id
        self._say(f"mlflow: uploaded {records} offline records ({values} metric values) of "
                  f"this run directory first")

    def _start_run(self, experiment: str, run_name: str, tags: dict, params: dict) -> None:
        client = self.client
        if self.run_id is None:
            parent = tags.get("mlflow.parentRunId")
            if parent:
                _existing_run(client, parent, self.uri, "tracking.parent_run_id")
            exp_id = store.experiment_id(client, self.uri, experiment)
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            fallback.write_run_id(self.run_dir, self.run_id)
            self._send({"op": "params", "params": params})
            verb = "logging to"
        else:
            run = _existing_run(client, self.run_id, self.uri, "tracking.uri")
            self._send({"op": "status", "status": "RUNNING"})
            self._send({"op": "params", "params": _new_params(run, params, tags)})
            self._send({"op": "tags", "tags": tags})
            exp_id, verb = run.info.experiment_id, "appending to"
        where = (f"{self.uri.rstrip('/')}/#/experiments/{exp_id}/runs/{self.run_id}"
                 if store.is_server(self.uri) else f"{self.uri} (browse: moe-lab ui)")
        self._say(f"mlflow: {verb} run {self.run_id} ({run_name}), experiment {experiment}: "
                  f"{where}")

    def start(self, resume_step: int) -> None:
        """Called by the loop once the model is restored: training starts after resume_step."""
        self._started = time.perf_counter()
        self._last_step = resume_step
        if resume_step:
            self._send({"op": "tags", "tags": {"resumed_from_step": resume_step}})

    # -- during training ---------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        began = time.perf_counter()
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            number = _number(value)
            if key in _NOT_LOGGED or number is None:
                continue
            if split != "train" and not key.startswith(f"{split}/"):
                key = f"{split}/{key}"  # e.g. a valid row's plain `loss` is `valid/loss`
            self._buffer.append([key, number, timestamp, step])
        self._last_step = max(self._last_step, step)
        if (len(self._buffer) >= store.MAX_METRICS
                or began - self._last_flush >= FLUSH_SECONDS):
            self.flush()
        self.busy_s += time.perf_counter() - began

    def log_expert_load(self, step: int, matrix) -> bool:
        """Every tracking.expert_load_interval steps and at the last step: the [MoE layers,
        experts] token counts as expert_load/step_NNNNNNN.npy and .png. Returns whether it did."""
        if not self.load_interval:
            return False
        if step % self.load_interval and step != self.max_steps:
            return False
        began = time.perf_counter()
        counts = expert_load.check_matrix(matrix)
        for path in expert_load.save(self.run_dir / "expert_load", step, counts,
                                     self.moe_layer_numbers):
            self._send({"op": "artifact", "path": str(path), "artifact_path": "expert_load"})
        self.busy_s += time.perf_counter() - began
        return True

    def flush(self) -> None:
        if self._buffer:
            self.values += len(self._buffer)
            self._send({"op": "metrics", "metrics": self._buffer})
            self._buffer = []
        self._tag_checkpoint()
        self._last_flush = time.perf_counter()

    def _tag_checkpoint(self) -> None:
        latest = latest_checkpoint(self.run_dir)
        if latest is not None and latest != self._checkpoint:
            self._checkpoint = latest
            self._send({"op": "tags", "tags": {"checkpoint.latest": str(latest.resolve()),
                                               "checkpoint.step": int(latest.name.split("_")[1])}})

    # -- end ---------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """Training raised: the run ends KILLED (interrupted) or FAILED instead of FINISHED."""
        self._status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        began = time.perf_counter()
        self.flush()
        checkpoints = sorted(checkpoint_dir(self.run_dir).glob("step_*"))
        if checkpoints:
            listing = "".join(f"{p.name}\t{p.resolve()}\n" for p in checkpoints if p.is_dir())
            self._send({"op": "text", "text": listing, "artifact_file": "checkpoints.txt"})
        # Not FINISHED when stopped early (--stop-at-step, preemption): a sweep re-runs it.
        status = self._status or ("FINISHED" if self._last_step >= self.max_steps else "KILLED")
        self._send({"op": "status", "status": status})
        self.busy_s += time.perf_counter() - began
        self._report(status)

    def _report(self, status: str) -> None:
        elapsed = time.perf_counter() - (self._started or self._last_flush)
        share = 100 * self.busy_s / elapsed if elapsed > 0 else 0.0
        self._say(f"mlflow: {self.values} metric values in {self.requests} requests, "
                  f"{self.busy_s * 1000:.1f} ms logging = {share:.2f}% of {elapsed:.1f} s "
                  f"training; run {status}")
        if self.client is None:
            self._say(f"mlflow: the store was not reachable; upload the records kept in "
                      f"{self.journal.path} with: moe-lab tracking sync {self.run_dir}",
                      self.warnings)

    # -- sending -----------------------------------------------------------------------------

    def _send(self, record: dict) -> None:
        if self.client is not None:
            try:
                self.requests += fallback.apply(self.client, self.run_id, record)
                return
            except Exception as err:
                self._go_offline(err)
        self.journal.append(record)

    def _go_offline(self, reason) -> None:
        """Said once; from here on every record goes to the journal."""
        self.client = None
        first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else repr(reason)
        self._say(f"moe-lab: MLflow tracking unavailable ({first_line[:300]}); training "
                  f"continues and keeps the records in {self.journal.path} "
                  f"(upload later: moe-lab tracking sync {self.run_dir})", self.warnings)
        if not self.journal.exists() and self.run_id is not None:
            self.journal.append({"op": "run", "uri": self.uri, "run_id": self.run_id})

    def _say(self, message: str, stream=None) -> None:
        stream = stream or self.stream
        if stream is not None:
            print(message, file=stream, flush=True)


def _run_tags(cfg: ExperimentConfig, run_dir: Path) -> dict[str, str]:
    """The tags that follow from the config and run directory (launch/ adds the machine's)."""
    t = cfg.tracking
    tags = {"parallel.layout": cfg.parallel.describe(), "run_dir": str(run_dir.resolve()),
            "checkpoint.dir": str(checkpoint_dir(run_dir).resolve())}
    if cfg.moe.enabled:
        pattern = cfg.moe.moe_layers(cfg.model.num_layers)
        tags["moe.router"] = str(cfg.moe.router.get("name"))
        # Rows of the expert-load matrices (moe-lab compare labels its heatmaps with them).
        tags["moe.layer_numbers"] = ",".join(str(i) for i, m in enumerate(pattern) if m)
    if t.parent_run_id:
        tags["mlflow.parentRunId"] = t.parent_run_id
    if t.sweep_id:
        tags["sweep_id"] = t.sweep_id
    return tags


def _number(value) -> float | None:
    """Python and numpy scalars and 0-d tensors are metrics; strings and arrays are not."""
    if isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _existing_run(client, run_id: str, uri: str, key: str):
    try:
        return client.get_run(run_id)
    except store.mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    hint = ("the run directory's mlflow_run_id names it; use the store that holds it "
            "(tracking.uri) or remove mlflow_run_id to start a new MLflow run"
            if key == "tracking.uri" else "create the parent run first (moe-lab sweep does)")
    raise ConfigError(f"{key}: MLflow run {run_id} is not in {uri}; {hint}", key=key)


def _new_params(run, params: dict[str, str], tags: dict) -> dict[str, str]:
    """On resume, only params the run lacks (MLflow refuses to change a param's value); a changed
    value (e.g. a longer training.max_steps) is noted in the tag resume.changed_params."""
    logged = run.data.params
    changed = [f"{k}: {logged[k]} -> {v}" for k, v in params.items() if k in logged
               and logged[k] != v]
    if changed:
        tags["resume.changed_params"] = "; ".join(changed)[:5000]
    return {k: v for k, v in params.items() if k not in logged}
