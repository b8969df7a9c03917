"""A dense tiny checkpoint to upcycle, trained for a few steps through the real CLI."""

from pathlib import Path

import pytest

from moe_lab.testing import run_cli

from ..conftest import TINY_DENSE


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dense") / "run"
    result = run_cli(["train", TINY_DENSE, "--run-dir", str(run_dir), "training.max_steps=4",
                      "optimizer.warmup_steps=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
