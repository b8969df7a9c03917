"""`moe-lab sweep --launcher local`: members as local processes under an MLflow parent run;
members' routers and layouts are checked before anything starts. (Re-runs skipping finished
members: tests/slurm/test_sweep_array.py, the same code for both launchers.)

Run: pytest tests/launch/test_sweep_local.py
"""

from __future__ import annotations

import pytest
import yaml

from moe_lab.testing import run_cli

from ..conftest import TINY_MOE


def test_local_sweep_runs_members_in_parallel_under_a_finished_parent_run(tmp_path):
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


def test_members_with_an_unknown_router_or_a_layout_that_does_not_fit_are_refused(tmp_path):
    from moe_lab.config import ConfigError
    from moe_lab.config.sweep import load_sweep
    from moe_lab.launch.sweep import check_members

    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"sweep": {"name": "s", "base": TINY_MOE, "members": [
        {"name": "ok", "moe.topk": 1}, {"name": "typo", "moe.router": {"name": "top_k"}}]}}))
    with pytest.raises(ConfigError, match=r"s.yaml: member typo: moe.router.name: unknown "
                                          r"router 'top_k'"):
        check_members(load_sweep(sweep_file), world_size=1)
    sweep_file.write_text(yaml.safe_dump({"sweep": {"name": "s", "base": TINY_MOE,
                                                    "grid": {"parallel.ep": [1, 4]}}}))
    with pytest.raises(ConfigError, match=r"member ep=4: parallel.ep: ep\*etp\*pp = 4\*1\*1 "
                                          r"does not divide the world size 2"):
        check_members(load_sweep(sweep_file), world_size=2)
