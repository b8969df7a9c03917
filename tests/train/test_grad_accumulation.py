"""train/grad_accumulation.py: each bf16 gradient added into megatron's fp32 main gradient by a
Triton kernel under megatron's grad_added_to_main_grad protocol. Checked on the CPU through
Triton's interpreter against megatron's own add, in a real training step.

Run: pytest tests/train/test_grad_accumulation.py
"""

import json
import subprocess
import sys

import pytest

from moe_lab.testing.distributed import child_env

from ..conftest import REPO, TINY_MOE


def _interpreted(module: str) -> dict:
    """Runs `module` on tiny_moe under Triton's interpreter; the JSON of its last line."""
    result = subprocess.run([sys.executable, "-m", module, TINY_MOE], cwd=REPO,
                            env=child_env({"TRITON_INTERPRET": "1"}), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hooks_accumulate_bit_for_bit_like_megatrons_add():
    got = _interpreted("tests.train.interpreted_grad_accumulation")
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


def test_the_step_zeroes_only_the_main_gradients_no_hook_writes_first(world):
    """train/grad_accumulation.py `zero_grad_buffer` with `zero_unwritten_before_reduce`: the
    hooked parameters' main gradients are not zeroed before a step (their first gradient is
    written, not added), a hooked parameter that gets no gradient is zeroed before DDP's
    reduction, and two steps of two micro-batches leave the same buffers as megatron's
    zero_grad_buffer."""
    import torch
    from megatron.core.distributed import finalize_model_grads

    from moe_lab import config as C
    from moe_lab.data import SyntheticTokens
    from moe_lab.model import build_model, build_transformer_config
    from moe_lab.train.grad_accumulation import (fuse_main_grad_accumulation, zero_grad_buffer,
                                                 zero_unwritten_before_reduce)
    from moe_lab.train.optim import wrap_ddp

    cfg = C.load(TINY_MOE, ["tracking.enabled=false", "training.precision=bf16",
                            "optimizer.precision_aware=true", "optimizer.main_grads_dtype=bf16"])
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)

    def two_steps(skip_zeros: bool):
        torch.manual_seed(0)
        config = build_transformer_config(cfg, use_cpu_initialization=True)
        gpt = build_model(cfg, config)
        gpt.unused = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))  # no gradient
        model = wrap_ddp(cfg, config, gpt)
        fuse_main_grad_accumulation(model, device_type="cpu")
        config.finalize_model_grads_func, config.no_sync_func = finalize_model_grads, model.no_sync
        if skip_zeros:
            zero_unwritten_before_reduce(model)
        hooked = model.moe_lab_written_first
        assert any(p is gpt.unused for p in hooked)
        probe = next(p for p in hooked if p.numel() > 1000)
        kept_before_backward = []
        for step in (0, 1):
            for p in (probe, gpt.unused):  # what a previous step could have left there
                p.main_grad.fill_(7.0)
            zero_grad_buffer(model)
            kept_before_backward.append(bool((probe.main_grad == 7.0).all()))
            _two_micro_batches(cfg, model, data, step)
        buffers = [b.grad_data.clone() for b in model.buffers + model.expert_parallel_buffers]
        return buffers, kept_before_backward, gpt.unused.main_grad.clone()

    megatrons, zeroed, unused_megatron = two_steps(skip_zeros=False)
    ours, kept, unused_ours = two_steps(skip_zeros=True)
    assert zeroed == [False, False] and kept == [True, True]
    assert torch.equal(unused_megatron, torch.zeros(8)) and torch.equal(unused_ours,
                                                                         torch.zeros(8))
    assert all(bool(b.abs().sum() > 0) for b in ours)
    assert all(torch.equal(a, b) for a, b in zip(megatrons, ours))


def _two_micro_batches(cfg, model, data, step: int) -> None:
    """Step `step`'s forward and backward of two micro-batches through megatron's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moe_lab.train.step import forward_step_func

    get_forward_backward_func()(
        forward_step_func=forward_step_func(cfg),
        data_iterator=iter([data.batch([4 * step + i, 4 * step + i + 1]) for i in (0, 2)]),
        model=[model], num_microbatches=2, seq_length=cfg.training.seq_length,
        micro_batch_size=2, forward_only=False)


def test_hooks_and_skipped_zeroing_under_overlap_grad_reduce(world):
    """parallel.overlap_grad_reduce: megatron's backward hook starts each bucket's reduction
    once the bucket is complete, after ours wrote the main gradient; two steps of two
    micro-batches leave the buffers megatron's own accumulation and zeroing leave."""
    import torch
    from megatron.core.distributed import finalize_model_grads

    from moe_lab import config as C
    from moe_lab.data import SyntheticTokens
    from moe_lab.model import build_model, build_transformer_config
    from moe_lab.train.grad_accumulation import (fuse_main_grad_accumulation, zero_grad_buffer,
                                                 zero_unwritten_before_reduce)
    from moe_lab.train.optim import wrap_ddp

    cfg = C.load(TINY_MOE, ["tracking.enabled=false", "training.precision=bf16",
                            "optimizer.precision_aware=true", "optimizer.main_grads_dtype=bf16",
                            "parallel.overlap_grad_reduce=true"])
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)

    def two_steps(hooked: bool):
        torch.manual_seed(0)
        config = build_transformer_config(cfg, use_cpu_initialization=True)
        model = wrap_ddp(cfg, config, build_model(cfg, config))
        config.finalize_model_grads_func, config.no_sync_func = finalize_model_grads, model.no_sync
        if hooked:
            fuse_main_grad_accumulation(model, device_type="cpu")
            zero_unwritten_before_reduce(model)
        for step in (0, 1):
            zero_grad_buffer(model)  # megatron's own where nothing is hooked
            _two_micro_batches(cfg, model, data, step)
        return model, [b.grad_data.clone() for b in model.buffers + model.expert_parallel_buffers]

    _, megatrons = two_steps(hooked=False)
    model, ours = two_steps(hooked=True)
    # megatron launches from the hooks from the second step on, once the first recorded which
    # parameters get gradients (at the reset in zero_grad_buffer)
    groups = model.bucket_groups + model.expert_parallel_bucket_groups
    assert model.ddp_config.overlap_grad_reduce and groups
    assert not any(group.is_first_batch for group in groups)
    assert model.moe_lab_written_first and getattr(model, "moe_lab_zeroes_unwritten", False)
    assert all(bool(b.abs().sum() > 0) for b in ours)
    assert all(torch.equal(a, b) for a, b in zip(megatrons, ours))


def test_one_rank_one_micro_batch_norm_comes_from_the_hooks_squares():
    """train/grad_accumulation.py `HookSquares`: with one micro-batch the gradient norm is summed
    from the squares the hooks left and equals the norm read from megatron's own accumulation;
    with two micro-batches (a second gradient is added) the step falls back to reading the
    gradients, with the same result."""
    got = _interpreted("tests.train.interpreted_hook_squares")
    assert got["interpreted"]
    (ref1, ours1), (ref2, ours2) = got["one"], got["two"]
    assert ours1["complete"] and ours1["covers"] == [True]  # the squares were used
    assert not ours2["complete"] and ours2["covers"] == []  # never offered: the add broke them
    for ref, ours in ((ref1, ours1), (ref2, ours2)):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert all(n > 0 for n in ours["grad_norm"])
