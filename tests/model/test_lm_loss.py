"""training.cross_entropy=fused_linear (model/lm_loss.py): the chunked output layer + cross-entropy
gives megatron's loss and gradients.

Run: pytest tests/model/test_lm_loss.py
"""

import pytest
import torch

from moe_lab import config as C
from moe_lab.data import SyntheticTokens
from moe_lab.model import lm_loss
from moe_lab.train.loop import build_training
from moe_lab.train.step import Trainer

from ..conftest import TINY_MOE


@pytest.fixture
def small_chunks(monkeypatch):
    """Several chunks even for a tiny input (the chunk loop is what is under test)."""
    monkeypatch.setattr(lm_loss, "_CHUNK_ELEMENTS", 7 * 50)


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(50, (23,), generator=gen)
    return hidden, weight, labels


def test_loss_and_gradients_equal_the_unfused_computation(small_chunks):
    assert lm_loss.chunk_size(23, 50) == 6  # 4 chunks, the last one shorter
    hidden, weight, labels = _inputs()
    # A masked token and a uniform factor on top: the form of moe-lab's loss (sum / count).
    mask = torch.ones(23)
    mask[5] = 0.0
    fused = lm_loss.LinearCrossEntropy.apply(hidden, weight, labels, mask)
    ((fused * mask).sum() / 22).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    ref = lm_loss.linear_cross_entropy_reference(hidden, weight, labels)
    ((ref * mask).sum() / 22).backward()
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-7)
    assert got[0][5].abs().max() == 0  # the masked token gets no gradient


def test_under_no_grad_only_the_loss_is_computed(small_chunks, monkeypatch):
    hidden, weight, labels = _inputs()
    # the gradient pass must not run although the parameters say requires_grad
    monkeypatch.setattr(lm_loss, "_loss_and_grad", None)
    with torch.no_grad():
        fused = lm_loss.fused_lm_loss(hidden_states=hidden[:, None], output_layer=None,
                                      output_weight=weight, labels=labels[None])
        ref = lm_loss.linear_cross_entropy_reference(hidden, weight, labels)
    torch.testing.assert_close(fused[0], ref)


def _train(cross_entropy: str, steps: int = 3):
    cfg = C.load(TINY_MOE, ["tracking.enabled=false", "optimizer.warmup_steps=0",
                            f"training.cross_entropy={cross_entropy}"])
    assert cfg.fused_cross_entropy == (cross_entropy != "megatron")
    config, model, optimizer, scheduler = build_training(cfg, use_gpu=False)
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    return [trainer.step(step, [data.batch(list(range(step * 8 + m, step * 8 + m + 4)))
                                for m in (0, 4)]) for step in range(steps)]


def test_training_steps_equal_megatrons_loss(world, small_chunks):
    """Two micro-batches per step through megatron's schedule, its DDP gradient buffers and the
    optimizer: the losses and gradient norms of the two loss implementations agree."""
    fused, ref = _train("fused_linear"), _train("megatron")
    for got, want in zip(fused, ref):
        assert got["loss/lm"] == pytest.approx(want["loss/lm"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert fused[-1]["loss/lm"] != fused[0]["loss/lm"]


def test_fused_linear_with_tensor_parallelism_is_refused():
    with pytest.raises(C.ConfigError, match="training.cross_entropy.*parallel.tp=1"):
        C.load(TINY_MOE, ["training.cross_entropy=fused_linear", "parallel.tp=2"])
    assert not C.load(TINY_MOE, ["parallel.tp=2"]).fused_cross_entropy  # auto falls back


def test_triton_row_kernel_computes_what_the_torch_ops_do():
    """The GPU's chunk pass (one Triton program per row: a running logsumexp, then softmax -
    one-hot) through Triton's interpreter against the torch ops of the CPU path."""
    import json
    import os
    import subprocess
    import sys

    from ..conftest import REPO

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "tests.model.interpreted_lm_loss"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["interpreted"] and got["grad_dtype"] == "torch.bfloat16"
    assert got["loss_max_rel"] < 1e-5
    assert got["grad_within_one_bf16_step"]
    assert got["grad_rows_sum_to_zero"] < 0.05  # softmax sums to one, minus the one-hot
