"""A straight 12-step run with checkpoints every 2 steps, which the checkpoint, fault and
resharding tests compare against (its metrics) and damage copies of (its checkpoints)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moe_lab.testing import run_cli, run_cli_crashable
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE

STEPS = 12
RUN = [f"training.max_steps={STEPS}", "training.log_interval=1", "optimizer.warmup_steps=2",
       "checkpoint.interval=2", "checkpoint.keep_last=2", "checkpoint.keep_every=4",
       "tracking.enabled=false"]  # the manifest test plants its own mlflow_run_id
MLFLOW_RUN_ID = "0123456789abcdef"


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["train", TINY_MOE, "--run-dir", str(run_dir), *RUN, *extra]


def train(run_dir: Path, *extra: str, fault: str | None = None, expect: int = 0):
    if fault:  # it may be killed: clean up after it as a node failure would
        result = run_cli_crashable(train_args(run_dir, *extra), env={"MOE_LAB_TEST_FAULT": fault})
    else:
        result = run_cli(train_args(run_dir, *extra))
    assert result.returncode == expect, (fault, result.stdout[-2000:], result.stderr[-3000:])
    return result


def same_rows(run_dir: Path, reference: Path) -> None:
    """Every logged step's loss, grad norm and learning rate equal the reference's exactly."""
    got, want = read_metrics(run_dir / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        keys = ("loss", "grad_norm", "lr")
        assert [a[k] for k in keys] == [b[k] for k in keys], a["step"]


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_dir.mkdir()
    # What the MLflow sink leaves in a tracked run; the manifest records it.
    (run_dir / "mlflow_run_id").write_text(MLFLOW_RUN_ID + "\n")
    train(run_dir)
    return run_dir


@pytest.fixture
def run_copy(straight_run, tmp_path) -> Path:
    """A copy of the straight run to damage or continue."""
    return Path(shutil.copytree(straight_run, tmp_path / "run"))
