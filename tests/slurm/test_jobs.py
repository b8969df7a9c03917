"""`moe-lab submit` on a real Slurm cluster: a 2-node gloo job, the rendered script, bad input.

Run: pytest tests/slurm  (needs Debian's slurmctld/slurmd/slurm-client: scripts/ci.d/slurm.sh)
"""

from __future__ import annotations

import re
import subprocess

from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE
from .conftest import CPU_JOB, FAST, job_log



def test_two_node_job_trains_across_nodes_with_gloo(slurm_cluster, moe_lab_on, tmp_path):
    run_dir = tmp_path / "run"
    result = moe_lab_on(["submit", TINY_MOE, "--nodes", "2", *CPU_JOB, "--run-dir", run_dir,
                         "--wait", "training.max_steps=3", "parallel.ep=2", *FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + job_log(run_dir)
    job_id = (run_dir / "slurm_job_id").read_text().strip()
    assert f"submitted job {job_id}" in result.stdout
    (job,) = slurm_cluster.job_records(job_id)
    assert (job["JobState"], job["NodeCnt"], job["ExitCode"]) == ("COMPLETED", "2", "0:0")
    log = job_log(run_dir)
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
