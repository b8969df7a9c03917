"""Single-process training through the real CLI: loss falls, resume is exact, runs are safe.

Run: pytest tests/train/test_training.py
"""

import pytest

from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics

from ..conftest import TINY_DENSE, TINY_MOE

SHORT = ["training.max_steps=10", "training.log_interval=1", "optimizer.warmup_steps=2",
         "tracking.enabled=false"]  # MLflow has its own tests (tests/tracking)


def train(run_dir, *extra, config=TINY_MOE):
    result = run_cli(["train", config, "--run-dir", str(run_dir), *SHORT, *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("config", [TINY_MOE, TINY_DENSE], ids=["moe", "dense"])
def test_loss_falls_and_metrics_are_logged(tmp_path, config):
    train(tmp_path / "run", "training.max_steps=30", config=config)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    for key in ("loss", "loss/lm", "grad_norm", "lr", "throughput/tokens_per_s"):
        assert key in rows[-1]
    if config == TINY_MOE:
        assert 0.9 < rows[-1]["loss/aux"] < 2.0  # 1.0 is perfectly balanced
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000030"


def test_stop_and_resume_gives_exactly_the_straight_run(tmp_path):
    train(tmp_path / "straight")
    first = train(tmp_path / "resumed", "--stop-at-step", "6")
    assert "step 6/10" in first.stdout and "step 7/10" not in first.stdout
    second = train(tmp_path / "resumed")
    assert "resumed from" in second.stdout and "at step 6" in second.stdout
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]


def test_resume_refuses_another_model_and_keeps_the_run(tmp_path):
    run = tmp_path / "run"
    train(run, "training.max_steps=3", "optimizer.warmup_steps=0")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    result = run_cli(["train", TINY_MOE, "--run-dir", str(run), *SHORT, "model.hidden_size=32"])
    assert result.returncode == 2
    assert "model.hidden_size: 32 differs from 64" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (run / "metrics.jsonl").read_text() == metrics
