"""Parallel layouts (and backends) under gloo give the losses and grad norms of one process.

One 2-step checkpoint is continued for 3 steps in each layout (weights from the checkpoint, so
every layout starts from the same experts; dropout is 0). Each case is a real torchrun launch.
Run: pytest tests/train/test_parallel.py
"""

import pytest

from moe_lab.testing import run_distributed, run_srun_style
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE

LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "ep2_alltoall": (2, ["parallel.ep=2", "moe.dispatcher=alltoall"]),
    "ep2_allgather": (2, ["parallel.ep=2", "moe.dispatcher=allgather"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
    # each gradient bucket reduced as soon as the backward pass completes it
    "dp2_overlap_grad_reduce": (2, ["parallel.overlap_grad_reduce=true"]),
    "ep2_overlap_grad_reduce": (2, ["parallel.ep=2", "parallel.overlap_grad_reduce=true"]),
    "tp2_ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    # the torch backend (grouped-GEMM experts, SDPA attention) loads the local backend's
    # checkpoint layout and computes the same
    "torch_backend": (1, ["model.backend=torch"]),
    "torch_backend_ep2": (2, ["model.backend=torch", "parallel.ep=2"]),
}


def continue_from(checkpoint, run_dir, nproc, overrides):
    args = ["train", TINY_MOE, "--run-dir", str(run_dir), "training.max_steps=3",
            "optimizer.warmup_steps=1", "training.log_interval=1",
            f"checkpoint.init_from={checkpoint}", "tracking.enabled=false", *overrides]
    result = run_distributed(nproc, args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"world {nproc}" in result.stdout  # the run used the layout it was asked for
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    return continue_from(tiny_checkpoint, tmp_path_factory.mktemp("ref") / "run", 1, [])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_layout_matches_one_process(layout, reference, tiny_checkpoint, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    rows = continue_from(tiny_checkpoint, tmp_path / "run", nproc, overrides)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for ref, got in zip(reference, rows):
        for key in ("loss", "loss/lm", "grad_norm"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5), (layout, ref["step"], key)


@pytest.mark.slow
def test_srun_style_variables_start_a_two_rank_run(tiny_checkpoint, reference, tmp_path):
    args = ["train", TINY_MOE, "--run-dir", str(tmp_path / "run"), "training.max_steps=3",
            "optimizer.warmup_steps=1", "training.log_interval=1",
            f"checkpoint.init_from={tiny_checkpoint}", "parallel.ep=2", "tracking.enabled=false"]
    results = run_srun_style(2, args)
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    assert "world 2" in results[0].stdout
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-5)


def test_layout_that_does_not_fit_is_refused_before_start(tmp_path):
    result = run_distributed(2, ["train", TINY_MOE, "--run-dir", str(tmp_path / "r"),
                                 "parallel.tp=2", "parallel.pp=2"])
    assert result.returncode != 0
    assert "tp*pp*cp = 2*2*1 = 4 does not divide the world size 2" in result.stderr
    assert not (tmp_path / "r").exists()
