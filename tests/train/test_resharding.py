"""Resume in another parallel layout with model AND optimizer state.

A run saved under EP=2 (two ranks, expert parallel) at step 3 is resumed under EP=1, TP=2, PP=2,
TP2xEP2 and DP=2: its next 5 steps match the same-layout continuation within 1e-5 (fp32 sums in
another order), which itself equals the uninterrupted EP=2 run exactly. megatron-core's own
optimizer formats cannot do EP=2 -> EP=1; train/optimizer_state.py saves the optimizer in
parameter space. Every case is a real torchrun launch.
Run: pytest tests/train/test_resharding.py
"""

from __future__ import annotations

import shutil

import pytest

from moe_lab.testing import run_cli, run_distributed
from moe_lab.tracking import read_metrics
from moe_lab.train.manifest import read

from ..conftest import TINY_MOE

RUN = ["training.max_steps=8", "training.log_interval=1", "optimizer.warmup_steps=1",
       "checkpoint.interval=3", "checkpoint.keep_last=0"]
SAVED_AT = 3
LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),  # the same layout: the reference, exactly
    "ep1": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2_ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    "dp2": (2, []),
}


def launch(nproc, run_dir, overrides):
    args = ["train", TINY_MOE, "--run-dir", str(run_dir), *RUN, *overrides]
    result = run_distributed(nproc, args) if nproc > 1 else run_cli(args)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """The uninterrupted EP=2 run; it keeps its step-3 checkpoint."""
    run_dir = tmp_path_factory.mktemp("ep2") / "run"
    launch(2, run_dir, ["parallel.ep=2"])
    return run_dir


def at_step_3(ep2_run, tmp_path):
    """A copy of the EP=2 run as a crash after step 3's checkpoint would have left it."""
    run_dir = shutil.copytree(ep2_run, tmp_path / "run")
    for later in (run_dir / "checkpoints").glob("step_*"):
        if int(later.name[5:]) > SAVED_AT:
            shutil.rmtree(later)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{SAVED_AT:07d}\n")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_in_another_layout_continues_like_the_same_layout(layout, ep2_run, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    run_dir = at_step_3(ep2_run, tmp_path)
    result = launch(nproc, run_dir, overrides)
    assert f"world {nproc}" in result.stdout
    assert f"step_{SAVED_AT:07d} at step {SAVED_AT}" in result.stdout
    reference = read_metrics(ep2_run / "metrics.jsonl")[SAVED_AT:]
    resumed = read_metrics(run_dir / "metrics.jsonl")[SAVED_AT:]
    assert [r["step"] for r in resumed] == [4, 5, 6, 7, 8]
    for ref, got in zip(reference, resumed):
        for key in ("loss", "grad_norm"):
            if layout == "ep2":
                assert got[key] == ref[key], (ref["step"], key)
            else:
                assert got[key] == pytest.approx(ref[key], rel=1e-5), (layout, ref["step"], key)
    layout_saved = read(run_dir / "checkpoints" / "step_0000008")["parallel"]
    assert layout_saved["world_size"] == nproc
