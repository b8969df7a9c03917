"""Preemption on a real Slurm cluster: a job signalled before its time limit, or requeued by
Slurm, saves, requeues, resumes, and ends with the loss of an uninterrupted run.

Run: pytest tests/slurm/test_preemption.py  (needs Debian's Slurm: scripts/ci.d/slurm.sh)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import pytest

from moe_lab.testing.distributed import REPO, child_env
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE
from .conftest import CPU_JOB, FAST, job_log

HAS_MLFLOW_SINK = importlib.util.find_spec("moe_lab.tracking.mlflow_sink") is not None
PREEMPTED_STEPS = ["training.max_steps=30", *FAST]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference, trained locally while the Slurm jobs run: call it for its
    metrics rows."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moe_lab", "train", TINY_MOE, "--run-dir",
                             str(run_dir), *PREEMPTED_STEPS], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def metrics() -> list[dict]:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-2000:]
        return read_metrics(run_dir / "metrics.jsonl")

    yield metrics
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module", params=[
    # What --signal=B:USR1@N does before the time limit: USR1 to the batch shell only, which
    # passes it on; training saves and exits 75, and the script requeues the job.
    ["scancel", "--batch", "--signal=USR1"],
    # Preemption or an operator's requeue: Slurm sends TERM to every process and requeues.
    ["scontrol", "requeue"],
], ids=["usr1-before-time-limit", "scontrol-requeue"])
def preempted(request, slurm_cluster, tmp_path_factory, straight_run):
    """A tracked job preempted once it has logged step 2, run until it has finished."""
    root = tmp_path_factory.mktemp("preempted")
    run_dir = root / "run"
    submit = subprocess.Popen(
        [sys.executable, "-m", "moe_lab", "submit", TINY_MOE, *CPU_JOB, "--run-dir", str(run_dir),
         "--wait", *PREEMPTED_STEPS, "tracking.enabled=true",
         f"tracking.uri=sqlite:///{root / 'mlruns.db'}"], cwd=root,
        env=slurm_cluster.client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        _wait_for_step(run_dir, 2, timeout=300)
        job_id = (run_dir / "slurm_job_id").read_text().strip()
        subprocess.run([*request.param, job_id], check=True, env=slurm_cluster.client_env())
        output, _ = submit.communicate(timeout=400)
    finally:
        submit.kill()
    return request.param[0], root, run_dir, job_id, submit.returncode, output + job_log(run_dir)


def test_preempted_job_resumes_and_ends_with_the_uninterrupted_loss(preempted, straight_run,
                                                                     slurm_cluster):
    how, _, run_dir, job_id, code, log = preempted
    assert code == 0, log
    records = slurm_cluster.job_records(job_id)  # one per end: requeued, then completed
    assert [r["JobState"] for r in records] == ["PENDING", "COMPLETED"], records
    assert records[-1]["ExitCode"] == "0:0" and f"job {job_id} (restart 1)" in log
    stopped_at = int(log.split("stopped at step ")[1].split("/")[0])
    assert 2 <= stopped_at < 30, log  # the signal arrived mid-training
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:07d} at step {stopped_at}" in log
    if how == "scancel":
        assert "batch script got USR1" in log and f"requeued job {job_id}" in log
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 31))  # each step once, none lost
    assert resumed[-1]["loss"] == straight_run()[-1]["loss"]


@pytest.mark.skipif(not HAS_MLFLOW_SINK, reason="runs are logged by the MLflow sink (issue 8), "
                                                "not on this branch")
def test_preempted_job_appends_to_one_mlflow_run(preempted):
    from mlflow.tracking import MlflowClient

    _, root, run_dir, _, code, log = preempted
    assert code == 0, log
    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [(run_dir / "mlflow_run_id").read_text().strip()]
    assert runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert steps == list(range(1, 31))


def _wait_for_step(run_dir, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not reach step {step} in {timeout} s")
