"""Shared fixtures. Tests run on the CPU; multi-process tests start real torchrun ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lab.testing import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY_MOE = str(REPO / "experiments" / "tiny_moe.yaml")
TINY_DENSE = str(REPO / "experiments" / "tiny_dense.yaml")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A run directory holding a 2-step checkpoint of the tiny MoE, for layouts to continue."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    result = run_cli(["train", TINY_MOE, "--run-dir", str(run_dir), "training.max_steps=2",
                      "optimizer.warmup_steps=0", "tracking.enabled=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
