"""The optimizer step `moe-lab bench` measures for mcore_* variants (moe_lab/train/optim.py: torch's
fused AdamW, one multi-tensor gradient norm, clipping folded into the kernel) trains exactly like
megatron-core's own step() (foreach AdamW, its norm and clipping fallbacks without TE/apex).

Runs in this process as a world of one (gloo) with the CPU compatibility layer.
Run: pytest tests/bench/test_optimizer_step.py
"""

import pytest
import torch

from moe_lab import config as C
from moe_lab.data import SyntheticTokens
from moe_lab.train import optim
from moe_lab.train.loop import build_training
from moe_lab.train.step import Trainer

from ..conftest import TINY_MOE

# clip_grad below the gradient norms seen, so that clipping acts on every step. (The layer
# count stays tiny_moe's: megatron's MoE metrics tracker is process-global and sized by it.)
OVERRIDES = ["tracking.enabled=false", "optimizer.clip_grad=0.3", "optimizer.warmup_steps=0"]


def _train(fused: bool, steps: int = 4):
    cfg = C.load(TINY_MOE, OVERRIDES)
    config, model, optimizer, scheduler = build_training(cfg, use_gpu=False)
    assert optim.fused_step_ready(optimizer)  # torch AdamW on fp32 master params
    if not fused:  # back to what get_megatron_optimizer built: megatron's own step()
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            sub.optimizer.moe_lab_fused = False
            for group in sub.optimizer.param_groups:
                group["fused"], group["foreach"] = None, None
    assert (optim.prepare_and_norm(optimizer) is not None) == fused
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    rows = []
    for step in range(steps):
        batches = [data.batch(list(range(step * 8 + m, step * 8 + m + 4))) for m in (0, 4)]
        rows.append(trainer.step(step, batches))
    params = [p.detach().clone() for p in model.parameters()]
    return rows, params


def test_fused_step_trains_like_megatrons_step(world):
    fused_rows, fused_params = _train(fused=True)
    ref_rows, ref_params = _train(fused=False)
    for got, ref in zip(fused_rows, ref_rows):
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert got["grad_norm"] > 0.3  # clipped
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    for got, ref in zip(fused_params, ref_params):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_resumed_step_counters_move_to_the_parameters_device(world):
    """A resumed run sets Adam's step counters as CPU tensors (train/optimizer_state.py); the
    fused kernel wants them beside the parameters. On the CPU both are CPU: the hook must leave
    them working and counting."""
    cfg = C.load(TINY_MOE, OVERRIDES)
    _, model, optimizer, _ = build_training(cfg, use_gpu=False)
    sub = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    for p in sub.optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
        sub.optimizer.state[p].update(step=torch.tensor(5.0), exp_avg=torch.zeros_like(p),
                                      exp_avg_sq=torch.zeros_like(p))
    sub.optimizer.step()
    steps = {float(s["step"]) for s in sub.optimizer.state.values() if "step" in s}
    assert steps == {6.0}


def test_a_step_other_than_the_one_queued_early_is_refused(world):
    """Trainer.step(s, ..., next_batches) queues step s + 1's forward and backward; a call for
    another step would mix their routing counts and balancing losses into its own."""
    cfg = C.load(TINY_MOE, OVERRIDES)
    config, model, optimizer, scheduler = build_training(cfg, use_gpu=False)
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    batches = [data.batch([0, 1, 2, 3])]
    trainer.step(0, batches, next_batches=batches)
    assert trainer.step(1, batches)["loss"] > 0  # the queued one
    trainer.step(2, batches, next_batches=batches)
    with pytest.raises(RuntimeError, match=r"Trainer.step\(4\) after step 3's forward"):
        trainer.step(4, batches)
