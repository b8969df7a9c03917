"""train/grad_accumulation.py: each bf16 gradient added into megatron's fp32 main gradient by a
Triton kernel under megatron's grad_added_to_main_grad protocol. Checked on the CPU through
Triton's interpreter against megatron's own add, in a real training step.

Run: pytest tests/train/test_grad_accumulation.py
"""

import json
import subprocess
import sys

from moe_lab.testing.distributed import child_env

from ..conftest import REPO, TINY_MOE


def test_hooks_accumulate_bit_for_bit_like_megatrons_add():
    env = child_env({"TRITON_INTERPRET": "1"})
    result = subprocess.run([sys.executable, "-m", "tests.train.interpreted_grad_accumulation",
                             TINY_MOE], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["interpreted"]
    assert got["hooked"] == got["params"] > 0  # every bf16 parameter with a main_grad
    # megatron's hook saw the flag and only dropped the bf16 gradient
    assert got["flags_after_backward"] == [[False], [True]]
    assert got["grads_dropped"]
    assert got["flags_after_zero_grad"] == [False]  # megatron resets it every step
    # two micro-batches accumulated: the same fp32 sums, then the same update
    assert got["grad_buffers_nonzero"]
    assert got["grad_buffers_equal"]
    assert got["weights_equal"]


def test_bf16_main_gradients_are_written_first_then_added_like_megatrons_add(world):
    """The precision-aware optimizer's bf16 main gradients (optimizer.main_grads_dtype=bf16):
    the step's first gradient is copied into the zeroed buffer instead of added to it, later
    micro-batches are added; the buffers hold the same bf16 sums as megatron's own add."""
    import torch

    from moe_lab import config as C
    from moe_lab.model import build_model, build_transformer_config
    from moe_lab.train.grad_accumulation import fuse_main_grad_accumulation
    from moe_lab.train.optim import wrap_ddp

    cfg = C.load(TINY_MOE, ["tracking.enabled=false", "training.precision=bf16",
                            "optimizer.precision_aware=true", "optimizer.main_grads_dtype=bf16"])

    def two_micro_batches(hooked: bool):
        torch.manual_seed(0)
        config = build_transformer_config(cfg, use_cpu_initialization=True)
        model = wrap_ddp(cfg, config, build_model(cfg, config))
        hooks = fuse_main_grad_accumulation(model, device_type="cpu") if hooked else []
        model.zero_grad_buffer()
        for seed in (1, 2):
            gen = torch.Generator().manual_seed(seed)
            tokens = torch.randint(cfg.model.vocab_size, (2, cfg.training.seq_length),
                                   generator=gen)
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            model(tokens, positions, None, labels=tokens).float().mean().backward()
        buffers = [b.grad_data.clone() for b in model.buffers + model.expert_parallel_buffers]
        return len(hooks), buffers

    _, megatrons = two_micro_batches(hooked=False)
    hooked, ours = two_micro_batches(hooked=True)
    assert hooked > 0 and {b.dtype for b in ours} == {torch.bfloat16}
    assert all(bool(b.abs().sum() > 0) for b in ours)
    assert all(torch.equal(a, b) for a, b in zip(megatrons, ours))
