"""One GPU with Transformer Engine: megatron's precision-aware optimizer (optimizer.precision_aware,
bf16 moments and main gradients, fp32 master weights) trains like the default fp32 optimizer
state, and its state survives a checkpoint.

Run: pytest tests/gpu/test_precision_aware.py -s
"""

import importlib.util

import pytest

from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE
from .conftest import needs_gpus, report
from .test_backends import COMMON

needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs Transformer Engine (TE's FusedAdam)")
BF16_STATE = ["optimizer.precision_aware=true", "optimizer.exp_avg_dtype=bf16",
              "optimizer.exp_avg_sq_dtype=bf16", "optimizer.main_grads_dtype=bf16"]
STEPS = ["training.max_steps=30", "optimizer.lr=1e-3", "model.backend=torch"]


def _train(run_dir, *overrides, stop_at=None):
    args = ["train", TINY_MOE, "--run-dir", str(run_dir), *STEPS, *COMMON, *overrides]
    result = run_cli(args + ([] if stop_at is None else ["--stop-at-step", str(stop_at)]))
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(run_dir / "metrics.jsonl")


@needs_gpus(1)
@needs_te
def test_bf16_optimizer_state_trains_like_fp32_and_resumes(tmp_path):
    fp32 = _train(tmp_path / "fp32")
    bf16 = _train(tmp_path / "bf16", *BF16_STATE)
    _train(tmp_path / "resumed", *BF16_STATE, stop_at=15)
    resumed = _train(tmp_path / "resumed", *BF16_STATE)
    last = {name: curve[-1]["loss/lm"] for name, curve in
            (("fp32 state", fp32), ("bf16 state", bf16), ("bf16 state, resumed at 15", resumed))}
    report("precision_aware_optimizer", {"loss/lm step 1": [fp32[0]["loss/lm"], bf16[0]["loss/lm"]],
                                         "loss/lm step 30": last})
    assert bf16[0]["loss/lm"] == pytest.approx(fp32[0]["loss/lm"], rel=1e-3)  # same weights
    assert last["bf16 state"] < 0.9 * bf16[0]["loss/lm"]  # it learns
    assert last["bf16 state"] == pytest.approx(last["fp32 state"], rel=2e-2)
    # The checkpoint holds the moments, the fp32 master weights and Adam's step.
    assert last["bf16 state, resumed at 15"] == pytest.approx(last["bf16 state"], rel=5e-3)
