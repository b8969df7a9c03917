"""`moe-lab sweep --launcher slurm`: one job array, an MLflow parent first, re-runs skip members.

Run: pytest tests/slurm/test_sweep_array.py  (needs Debian's Slurm: scripts/ci.d/slurm.sh)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from ..conftest import TINY_MOE

SLURM = ["--launcher", "slurm", "--gpus-per-node", "0", "--time", "00:20:00"]
ROUTERS = [{"name": "topk_softmax"}, {"name": "topk_softmax", "norm_topk_prob": True},
           {"name": "topk_sigmoid"}, {"name": "topk_sigmoid", "expert_bias": True}]
HAS_MLFLOW_SINK = importlib.util.find_spec("moe_lab.tracking.mlflow_sink") is not None


def write_sweep(path: Path, store: Path, **changes) -> Path:
    sweep = {"name": "routers", "base": TINY_MOE,
             "overrides": {"training.max_steps": 3, "optimizer.warmup_steps": 0,
                           "tracking.enabled": True, "tracking.uri": f"sqlite:///{store}"},
             "members": [{"name": r["name"] + ("_norm" if "norm_topk_prob" in r else "")
                          + ("_bias" if "expert_bias" in r else ""), "moe.router": r}
                         for r in ROUTERS]}
    sweep.update(changes)
    path.write_text(yaml.safe_dump({"sweep": sweep}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished_sweep(slurm_cluster, tmp_path_factory):
    """The 4-member router sweep run once as a job array, 2 tasks at a time."""
    from moe_lab.testing import run_cli

    root = tmp_path_factory.mktemp("sweep")
    sweep_file = write_sweep(root / "routers.yaml", root / "mlruns.db")
    result = run_cli(["sweep", str(sweep_file), *SLURM, "--max-parallel", "2", "--wait"],
                     cwd=root, env=slurm_cluster.env, timeout=900)
    return root, sweep_file, result


def test_sweep_runs_as_one_throttled_job_array_with_an_mlflow_parent(finished_sweep,
                                                                     slurm_cluster):
    from mlflow.tracking import MlflowClient

    root, _, result = finished_sweep
    sweep_dir = root / "runs" / "sweeps" / "routers"
    logs = "\n".join(p.read_text() for p in (sweep_dir / "logs").glob("*.out"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "4 members, 0 finished, 0 queued or running, 4 to run" in result.stdout
    assert "#SBATCH --array=0-3%2" in (sweep_dir / "job.sbatch").read_text()
    members = sorted(p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file())
    assert len(members) == 4
    (array_id,) = {(m / "slurm_job_id").read_text().strip().split("_")[0] for m in members}
    for task in range(4):  # one array job, a task per member
        (job,) = slurm_cluster.job_records(f"{array_id}_{task}")
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0")
    assert len(list((sweep_dir / "logs").glob("routers-*_*.out"))) == 4

    parent_id = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    parent = client.get_run(parent_id)
    assert parent.data.tags["sweep_role"] == "parent"
    assert parent.info.run_name == "routers"
    assert parent.info.status == "FINISHED"  # --wait: every member finished
    routers = set()
    for member in members:
        resolved = yaml.safe_load((member / "config.yaml").read_text())
        assert resolved["tracking"]["parent_run_id"] == parent_id
        assert resolved["tracking"]["sweep_id"] == parent.data.tags["sweep_id"]
        routers.add(yaml.safe_dump(resolved["moe"]["router"]))
        assert (member / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert len(routers) == 4


@pytest.mark.skipif(not HAS_MLFLOW_SINK, reason="member runs are logged by the MLflow sink "
                                                "(issue 8), not on this branch")
def test_sweep_members_are_children_of_the_parent_run(finished_sweep):
    from mlflow.tracking import MlflowClient

    root, _, result = finished_sweep
    assert result.returncode == 0, result.stderr
    parent_id = (root / "runs" / "sweeps" / "routers" / "mlflow_parent_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(c.info.run_name for c in children) == [
        "topk_sigmoid", "topk_sigmoid_bias", "topk_softmax", "topk_softmax_norm"]
    assert {c.info.status for c in children} == {"FINISHED"}


def test_rerunning_the_sweep_skips_finished_members(finished_sweep, slurm_cluster):
    from moe_lab.testing import run_cli

    root, sweep_file, first = finished_sweep
    assert first.returncode == 0, first.stderr
    jobs_before = slurm_cluster.jobcomp.read_text()
    again = run_cli(["sweep", str(sweep_file), *SLURM, "--max-parallel", "2"], cwd=root,
                    env=slurm_cluster.env)
    assert again.returncode == 0, again.stderr
    assert "4 members, 4 finished, 0 queued or running, 0 to run" in again.stdout
    assert "submitted" not in again.stdout
    assert slurm_cluster.squeue() == [] and slurm_cluster.jobcomp.read_text() == jobs_before


@pytest.mark.parametrize("change, message", [
    ({"overrides": {"training.max_step": 3}}, "member topk_softmax: training.max_step: unknown key"),
    ({"members": [], "grid": {"moe.router.name": []}},
     "sweep.grid.moe.router.name: needs a non-empty list"),
], ids=["unknown-key", "empty-grid"])
def test_bad_sweeps_are_refused_before_anything_is_submitted(change, message, slurm_cluster,
                                                             tmp_path):
    from moe_lab.testing import run_cli

    sweep_file = write_sweep(tmp_path / "bad.yaml", tmp_path / "mlruns.db", **change)
    jobs_before = slurm_cluster.jobcomp.read_text() if slurm_cluster.jobcomp.exists() else ""
    result = run_cli(["sweep", str(sweep_file), *SLURM], cwd=tmp_path, env=slurm_cluster.env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(sweep_file) in lines[0], result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns.db").exists()
    assert slurm_cluster.squeue() == []
    assert (slurm_cluster.jobcomp.read_text() if slurm_cluster.jobcomp.exists() else "") == \
        jobs_before
