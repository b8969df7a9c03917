"""One GPU with Transformer Engine: megatron's precision-aware optimizer (optimizer.precision_aware,
bf16 moments and main gradients, fp32 master weights) trains like the default fp32 optimizer
state, and its state survives a checkpoint; train/master_adamw.py's kernel steps that state like
TE's FusedAdam does, also with the master weights kept as remainders (store_param_remainders),
whose checkpoints hold fp32 master weights (train/master_remainders.py).

Run: pytest tests/gpu/test_precision_aware.py -s
"""

import importlib.util

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics
from moe_lab.train.resume import checkpoints

from ..conftest import TINY_MOE
from .conftest import needs_gpus, report
from .test_backends import COMMON

needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs Transformer Engine (TE's FusedAdam)")
BF16_STATE = ["optimizer.precision_aware=true", "optimizer.exp_avg_dtype=bf16",
              "optimizer.exp_avg_sq_dtype=bf16", "optimizer.main_grads_dtype=bf16"]
STEPS = ["training.max_steps=30", "optimizer.lr=1e-3", "model.backend=torch"]
# megatron's default: the fp32 master weights as the bf16 weights + TE's int16 remainders
REMAINDERS = [*BF16_STATE, "optimizer.store_param_remainders=true"]


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


@needs_gpus(1)
@needs_te
def test_kernel_steps_the_bf16_state_like_te_fused_adam(tmp_path):
    """`update_impl=triton` starts only where the kernel takes the update (it refuses otherwise):
    here on TE FusedAdam's bf16 moments and fp32 master weights, against TE's own step."""
    curves = {impl: _train(tmp_path / impl, *BF16_STATE, f"optimizer.update_impl={impl}",
                           "training.max_steps=10", "checkpoint.enabled=false")
              for impl in ("megatron", "triton")}
    losses = {impl: [row["loss/lm"] for row in rows] for impl, rows in curves.items()}
    norms = {impl: [row["grad_norm"] for row in rows] for impl, rows in curves.items()}
    report("precision_aware_kernel", {"loss/lm": losses, "grad_norm": norms})
    assert losses["triton"][0] == losses["megatron"][0]  # same start
    # the same AdamW in fp32 between bf16 loads and stores; TE's and torch's term order apart
    assert losses["triton"] == pytest.approx(losses["megatron"], rel=1e-2)
    assert norms["triton"] == pytest.approx(norms["megatron"], rel=5e-2)
    assert losses["triton"][-1] < losses["triton"][0]


def _masters_and_weights(run_dir, step, tmp_path):
    """{model key: (saved master weight, saved bf16 weight)} of the checkpoint at `step`."""
    out = tmp_path / f"{run_dir.name}_{step}.pt"
    dcp_to_torch_save(checkpoints(run_dir)[step], out)
    saved = torch.load(out, weights_only=False)
    prefix = "optimizer.state.param."
    return {k[len(prefix):]: (v, saved[k[len(prefix):]]) for k, v in saved.items()
            if k.startswith(prefix) and k[len(prefix):] in saved}


@needs_gpus(1)
@needs_te
def test_remainders_are_stepped_by_the_kernel_and_saved_as_fp32_masters(tmp_path):
    """With store_param_remainders the kernel steps TE's int16 remainders like TE's own step,
    and a checkpoint holds fp32 master weights (megatron-core alone would save the int16
    numbers and fail to load them), so runs with and without remainders resume from each
    other's checkpoints."""
    short = ["training.max_steps=10", "checkpoint.enabled=false"]
    losses = {impl: [r["loss/lm"] for r in _train(tmp_path / impl, *REMAINDERS, *short,
                                                   f"optimizer.update_impl={impl}")]
              for impl in ("megatron", "triton")}
    # remainders -> remainders, and a checkpoint without remainders -> remainders
    _train(tmp_path / "same", *REMAINDERS, stop_at=15)
    _train(tmp_path / "crossed", *BF16_STATE, stop_at=15)
    gaps = {}
    for run in ("same", "crossed"):
        pairs = _masters_and_weights(tmp_path / run, 15, tmp_path)
        assert pairs, f"{run}: no optimizer.state.param tensors"
        # an fp32 master weight is within half a bf16 step of its weight, and not the weight
        gaps[run] = max(float(((m.float() - w.float()).abs() / w.float().abs().clamp(
            min=1e-30)).max()) for m, w in pairs.values())
        assert gaps[run] <= 2 ** -8
        assert any(not torch.equal(m.float(), w.float()) for m, w in pairs.values())
    resumed = {run: _train(tmp_path / run, *REMAINDERS) for run in ("same", "crossed")}
    last = {run: rows[-1]["loss/lm"] for run, rows in resumed.items()}
    report("precision_aware_remainders", {"loss/lm, 10 steps": losses,
                                          "master vs weight, largest relative gap": gaps,
                                          "loss/lm step 30, resumed at 15": last})
    assert losses["triton"][0] == losses["megatron"][0]
    assert losses["triton"] == pytest.approx(losses["megatron"], rel=1e-2)
    assert losses["triton"][-1] < losses["triton"][0]
    assert last["same"] == pytest.approx(last["crossed"], rel=5e-3)
    # the run saved with remainders continues: the remainders were loaded and saved again
    assert _masters_and_weights(tmp_path / "same", 30, tmp_path)
