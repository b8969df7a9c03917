"""`moe-lab sweep --launcher local`: members as local processes under an MLflow parent run;
running it again skips what has finished.

Run: pytest tests/launch/test_sweep_local.py
"""

from __future__ import annotations

import yaml

from moe_lab.testing import run_cli

from ..conftest import TINY_MOE


def test_local_sweep_runs_members_in_parallel_and_a_rerun_skips_them(tmp_path):
    from mlflow.tracking import MlflowClient

    sweep_file = tmp_path / "lr.yaml"
    sweep_file.write_text(yaml.safe_dump({"sweep": {
        "name": "lr", "base": TINY_MOE,
        "overrides": {"training.max_steps": 2, "optimizer.warmup_steps": 0,
                      "tracking.enabled": True, "tracking.experiment": "lr-sweep"},
        "grid": {"optimizer.lr": [1.0e-3, 3.0e-3]}}}))
    first = run_cli(["sweep", str(sweep_file), "--max-parallel", "2"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 members, 0 finished, 0 queued or running, 2 to run" in first.stdout
    assert first.stdout.count("finished  lr=") == 2 and "all 2 members finished" in first.stdout

    sweep_dir = tmp_path / "runs" / "sweeps" / "lr"
    members = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [m.name.rsplit("-", 1)[0] for m in members] == ["lr=0.001", "lr=0.003"]
    parent_id = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    for member in members:
        assert (member / "checkpoints" / "latest").read_text().strip() == "step_0000002"
        resolved = yaml.safe_load((member / "config.yaml").read_text())
        assert resolved["tracking"]["parent_run_id"] == parent_id
        assert resolved["tracking"]["experiment"] == "lr-sweep"
        assert "run directory:" in (member / "train.log").read_text()
    # The default store: <cwd>/mlruns.db, as for `moe-lab train`.
    parent = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(parent_id)
    assert (parent.info.status, parent.data.tags["sweep_role"]) == ("FINISHED", "parent")

    again = run_cli(["sweep", str(sweep_file)], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 members, 2 finished, 0 queued or running, 0 to run" in again.stdout
    assert "started" not in again.stdout
