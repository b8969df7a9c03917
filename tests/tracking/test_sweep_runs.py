"""A sweep's MLflow parent run and the finished test for members, on a real sqlite store.

Run: pytest tests/tracking/test_sweep_runs.py
"""

from __future__ import annotations

from pathlib import Path

from moe_lab.testing.distributed import free_port
from moe_lab.tracking import sweep_runs


def _store(tmp_path: Path) -> sweep_runs.Store:
    return sweep_runs.Store(f"sqlite:///{tmp_path / 'mlruns.db'}", "ablation")


def _checkpoint(run_dir: Path, step: int) -> Path:
    (run_dir / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:07d}\n")
    return run_dir


def test_the_parent_run_is_created_once_with_its_tags(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    store = _store(tmp_path)
    first = sweep_runs.ensure_parent_run(store, "ablation-1a2b3c", "ablation", {"members": []})
    assert sweep_runs.ensure_parent_run(store, "ablation-1a2b3c", "ablation", {}) == first
    other = sweep_runs.ensure_parent_run(store, "ablation-ffffff", "ablation", {})
    assert other != first
    run = MlflowClient(store.uri).get_run(first)
    assert run.data.tags["sweep_id"] == "ablation-1a2b3c"
    assert run.data.tags["sweep_role"] == "parent" and run.info.run_name == "ablation"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts" / "ablation").as_uri())


def test_finished_means_an_mlflow_run_finished_at_max_steps_else_the_checkpoint(tmp_path,
                                                                                monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    store = _store(tmp_path)
    client = MlflowClient(store.uri)
    experiment = client.create_experiment("ablation")

    def tracked_member(name: str, last_step: int, status: str) -> Path:
        run = client.create_run(experiment)
        for step in range(1, last_step + 1):
            client.log_metric(run.info.run_id, "loss", 1.0 / step, step=step)
        client.set_terminated(run.info.run_id, status)
        (tmp_path / name).mkdir()
        (tmp_path / name / "mlflow_run_id").write_text(run.info.run_id + "\n")
        return tmp_path / name

    members = [
        (tracked_member("done", 3, "FINISHED"), 3, True),
        (tracked_member("preempted", 2, "KILLED"), 3, True),
        (tracked_member("stopped_early", 2, "FINISHED"), 3, True),  # --stop-at-step 2
        (_checkpoint(tmp_path / "untracked_done", 3), 3, False),
        (_checkpoint(tmp_path / "untracked_half", 1), 3, False),
        (tmp_path / "never_started", 3, True),
    ]
    assert sweep_runs.finished(members, store) == [True, False, False, True, False, False]


def test_an_unreachable_store_falls_back_to_checkpoints_and_is_asked_once(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = sweep_runs.Store(f"http://127.0.0.1:{free_port()}", "ablation")
    members = []
    for name, step in (("a", 3), ("b", 1)):
        run_dir = _checkpoint(tmp_path / name, step)
        (run_dir / "mlflow_run_id").write_text("0123456789abcdef\n")
        members.append((run_dir, 3, True))
    assert sweep_runs.finished(members, dead) == [True, False]
    assert capsys.readouterr().out.count("did not answer") == 1
