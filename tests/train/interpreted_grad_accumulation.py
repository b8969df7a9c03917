"""Run by tests/train/test_grad_accumulation.py in a child process with TRITON_INTERPRET=1:
one tiny_moe step (bf16, two micro-batches) with megatron's own gradient accumulation and one
with train/grad_accumulation.py's hooks (kernel run by Triton's interpreter), from the same
seed; prints what the test compares as JSON."""

import json
import os
import sys

import torch

from moe_lab import config as C
from moe_lab.compat import enable_cpu_compat
from moe_lab.data import SyntheticTokens
from moe_lab.launch.distributed import detect_env, init_distributed
from moe_lab.train.grad_accumulation import fuse_main_grad_accumulation
from moe_lab.train.loop import build_training
from moe_lab.train.step import Trainer

OVERRIDES = ["tracking.enabled=false", "training.precision=bf16", "optimizer.warmup_steps=0"]


def step(tiny_moe: str, fused: bool) -> dict:
    cfg = C.load(tiny_moe, OVERRIDES)
    config, model, optimizer, scheduler = build_training(cfg, use_gpu=False)
    hooked = len(fuse_main_grad_accumulation(model, device_type="cpu")) if fused else 0
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    batches = [data.batch([0, 1, 2, 3]), data.batch([4, 5, 6, 7])]  # two micro-batches
    trainer.step(0, batches)
    params = [p for p in model.module.parameters() if p.requires_grad]
    out = {"hooked": hooked, "params": len(params),
           "flags_after_backward": sorted({bool(p.grad_added_to_main_grad) for p in params}),
           "grads_dropped": all(p.grad is None for p in params),
           "grad_buffers": [b.grad_data.clone() for b in
                            model.buffers + model.expert_parallel_buffers],
           "weights": [p.detach().clone() for p in params]}
    model.zero_grad_buffer()
    out["flags_after_zero_grad"] = sorted({bool(p.grad_added_to_main_grad) for p in params})
    return out


if __name__ == "__main__":
    tiny_moe = sys.argv[1]
    enable_cpu_compat()
    init_distributed(C.load(tiny_moe, OVERRIDES), detect_env(os.environ), use_gpu=False)
    ref, got = step(tiny_moe, fused=False), step(tiny_moe, fused=True)
    print(json.dumps({
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "hooked": got["hooked"], "params": got["params"],
        "flags_after_backward": [ref["flags_after_backward"], got["flags_after_backward"]],
        "flags_after_zero_grad": got["flags_after_zero_grad"],
        "grads_dropped": got["grads_dropped"],
        "grad_buffers_equal": all(torch.equal(a, b) for a, b in
                                  zip(ref["grad_buffers"], got["grad_buffers"])),
        "grad_buffers_nonzero": all(bool(b.abs().sum() > 0) for b in got["grad_buffers"]),
        "weights_equal": all(torch.equal(a, b) for a, b in zip(ref["weights"], got["weights"])),
    }))
