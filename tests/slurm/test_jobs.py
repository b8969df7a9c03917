"""`moe-lab submit` on a real Slurm cluster: a 2-node gloo job, the rendered script, preemption.

Run: pytest tests/slurm  (needs Debian's slurmctld/slurmd/slurm-client: scripts/ci.d/slurm.sh)
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time

import pytest

from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE

HAS_MLFLOW_SINK = importlib.util.find_spec("moe_lab.tracking.mlflow_sink") is not None
CPU_JOB = ["--gpus-per-node", "0", "--time", "00:20:00"]
FAST = ["optimizer.warmup_steps=0", "training.log_interval=1", "tracking.enabled=false"]
PREEMPTED_STEPS = ["training.max_steps=30", *FAST]


def _log(run_dir) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))


def test_two_node_job_trains_across_nodes_with_gloo(slurm_cluster, moe_lab_on, tmp_path):
    run_dir = tmp_path / "run"
    result = moe_lab_on(["submit", TINY_MOE, "--nodes", "2", *CPU_JOB, "--run-dir", run_dir,
                         "--wait", "training.max_steps=3", "parallel.ep=2", *FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + _log(run_dir)
    job_id = (run_dir / "slurm_job_id").read_text().strip()
    assert f"submitted job {job_id}" in result.stdout
    job = slurm_cluster.job(job_id)
    assert (job["JobState"], job["NumNodes"], job["ExitCode"]) == ("COMPLETED", "2", "0:0")
    log = _log(run_dir)
    assert f"tiny_moe-{job_id}.out" in [p.name for p in (run_dir / "logs").iterdir()]
    assert re.search(r"on n\[\d-\d\]: run .*, master 127\.0\.0\.1:\d+", log), log
    assert "world 2, CPU" in log and "layout tp1-pp1-ep2" in log
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000003"


def test_dry_run_renders_the_gpu_script_and_the_cpu_one_passes_sbatch_test_only(
        slurm_cluster, moe_lab_on, tmp_path):
    gpu = run_cli(["submit", TINY_MOE, "--nodes", "2", "--gpus-per-node", "8", "--time",
                   "04:00:00", "--partition", "gpu", "--account", "proj", "--dry-run",
                   "--run-dir", str(tmp_path / "gpu"), "parallel.ep=8",
                   "training.global_batch_size=64"], cwd=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    script = gpu.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path}/gpu/logs/%x-%j.out", "srun --kill-on-bad-exit=1",
                 'scontrol requeue "$SLURM_JOB_ID"', "export MASTER_ADDR", "parallel.ep=8"):
        assert line in script, line
    assert "--container-image" not in script and "--array" not in script and "{{" not in script
    assert not (tmp_path / "gpu").exists()  # a dry run writes nothing

    cpu = moe_lab_on(["submit", TINY_MOE, "--nodes", "2", *CPU_JOB, "--dry-run", "--run-dir",
                      tmp_path / "cpu", "parallel.ep=2"], cwd=tmp_path)
    assert cpu.returncode == 0, cpu.stderr
    assert "--gpus-per-node" not in cpu.stdout
    script_path = tmp_path / "cpu.sbatch"
    script_path.write_text(cpu.stdout)
    (tmp_path / "cpu" / "logs").mkdir(parents=True)
    test_only = subprocess.run(["sbatch", "--test-only", str(script_path)], capture_output=True,
                               text=True, env=slurm_cluster.client_env())
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr


def test_submit_refuses_a_layout_that_does_not_fit_the_job_before_submitting(
        slurm_cluster, moe_lab_on, tmp_path):
    result = moe_lab_on(["submit", TINY_MOE, "--nodes", "3", *CPU_JOB, "--run-dir",
                         tmp_path / "run", "parallel.ep=2"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("moe-lab: error: parallel.ep: ep*etp*pp = 2*1*1 does not "
                                     "divide the world size 3")
    assert not (tmp_path / "run").exists() and slurm_cluster.squeue() == []


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference for the preemption tests."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(["train", TINY_MOE, "--run-dir", str(run_dir), *PREEMPTED_STEPS])
    assert result.returncode == 0, result.stderr[-2000:]
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module", params=[
    # What --signal=B:USR1@N does before the time limit: USR1 to the batch shell only, which
    # passes it on; training saves and exits 75, and the script requeues the job.
    ["scancel", "--batch", "--signal=USR1"],
    # Preemption or an operator's requeue: Slurm sends TERM to every process and requeues.
    ["scontrol", "requeue"],
], ids=["usr1-before-time-limit", "scontrol-requeue"])
def preempted(request, slurm_cluster, tmp_path_factory):
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
    return request.param[0], root, run_dir, job_id, submit.returncode, output + _log(run_dir)


def test_preempted_job_resumes_and_ends_with_the_uninterrupted_loss(preempted, straight_run,
                                                                     slurm_cluster):
    how, _, run_dir, job_id, code, log = preempted
    assert code == 0, log
    job = slurm_cluster.job(job_id)
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, job
    stopped_at = int(log.split("stopped at step ")[1].split("/")[0])
    assert 2 <= stopped_at < 30, log  # the signal arrived mid-training
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:07d} at step {stopped_at}" in log
    if how == "scancel":
        assert "batch script got USR1" in log and f"requeued job {job_id}" in log
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 31))  # each step once, none lost
    assert resumed[-1]["loss"] == straight_run[-1]["loss"]


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
