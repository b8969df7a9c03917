"""Run by tests/train/test_grad_accumulation.py in a child process with TRITON_INTERPRET=1:
tiny_moe steps (bf16, fp32 main gradients) with megatron's gradient accumulation and with
train/grad_accumulation.py's hooks, the skipped zeroing and the hooks' squares (kernel run by
Triton's interpreter), from the same seed; prints what the test compares as JSON."""

import json
import os
import sys

from moe_lab import config as C
from moe_lab.compat import enable_cpu_compat
from moe_lab.data import SyntheticTokens
from moe_lab.launch.distributed import detect_env, init_distributed
from moe_lab.train.grad_accumulation import (fuse_main_grad_accumulation,
                                             zero_unwritten_before_reduce)
from moe_lab.train.loop import build_training
from moe_lab.train.step import Trainer

OVERRIDES = ["tracking.enabled=false", "training.precision=bf16", "optimizer.warmup_steps=0"]


def run(tiny_moe: str, hooked: bool, micro_batches: int) -> dict:
    cfg = C.load(tiny_moe, OVERRIDES)
    config, model, optimizer, scheduler = build_training(cfg, use_gpu=False)
    squares = None
    if hooked:
        fuse_main_grad_accumulation(model, device_type="cpu", keep_squares=True)
        zero_unwritten_before_reduce(model)
        squares = model.moe_lab_hook_squares
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    out = {"grad_norm": [], "loss": []}
    for step in range(2):
        batches = [data.batch([4 * (micro_batches * step + i) + j for j in range(4)])
                   for i in range(micro_batches)]
        metrics = trainer.step(step, batches)
        out["grad_norm"].append(metrics["grad_norm"])
        out["loss"].append(metrics["loss/lm"])
    if squares is not None:
        out["complete"] = squares.complete
        out["covers"] = sorted(set(squares._covers.values()))
    return out


if __name__ == "__main__":
    tiny_moe = sys.argv[1]
    enable_cpu_compat()
    init_distributed(C.load(tiny_moe, OVERRIDES), detect_env(os.environ), use_gpu=False)
    print(json.dumps({
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "one": [run(tiny_moe, hooked=False, micro_batches=1),
                run(tiny_moe, hooked=True, micro_batches=1)],
        "two": [run(tiny_moe, hooked=False, micro_batches=2),
                run(tiny_moe, hooked=True, micro_batches=2)],
    }))
