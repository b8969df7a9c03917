"""Run by tests/train/test_master_adamw.py in a child process with TRITON_INTERPRET=1 (Triton
reads it when the kernel is defined): steps tiny_moe on the CPU with megatron's update (torch's
fused AdamW, then megatron's copy into the bf16 weights) and with train/master_adamw.py's kernel
run by Triton's interpreter, and prints what the test compares as JSON.

One step is compared: the interpreter rounds fp32 to bf16 by truncation where the GPU rounds to
nearest even, so from the second step on the two runs compute with different bf16 weights
(tests/gpu/test_master_adamw.py compares whole runs on the GPU). Under torchrun with two ranks
(data parallel) each rank updates its shard of the distributed optimizer and megatron's
all-gather must then give every rank the same bf16 weights. The kernel's run also gets a NaN
gradient at its second step: the kernel must skip on the GPU's flag (weights, moments and bf16
copies as after the first step), the step counts go back, and the third step is counted as
the second.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from moe_lab import config as C
from moe_lab.compat import enable_cpu_compat
from moe_lab.data import SyntheticTokens
from moe_lab.launch.distributed import detect_env, init_distributed
from moe_lab.train import master_adamw
from moe_lab.train.faults import Fault, FaultInjector
from moe_lab.train.loop import build_training
from moe_lab.train.step import Trainer

# bf16 weights (so megatron's copy and the kernel's bf16 write both act) and clipping (so the
# kernel's grad_scale acts); the distributed optimizer is the default.
OVERRIDES = ["tracking.enabled=false", "optimizer.clip_grad=0.3", "optimizer.warmup_steps=0",
             "training.precision=bf16", "optimizer.update_impl=megatron"]


def truncated(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def max_rel(got, ref) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp(min=1e-12))
               for x, y in zip(got, ref))


def same_on_every_rank(tensors) -> bool:
    flat = torch.cat([t.detach().float().view(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, flat) for g in gathered)


def snapshot(subs, model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [
        *(p for sub in subs for g in sub.optimizer.param_groups for p in g["params"]),
        *(s[k] for sub in subs for s in sub.optimizer.state.values()
          for k in ("exp_avg", "exp_avg_sq")),
        *model.parameters()]]


def train(tiny_moe: str, kernel: bool, steps: int, extra: list[str]) -> dict:
    cfg = C.load(tiny_moe, OVERRIDES + extra + ["training.on_nonfinite=skip"])
    config, model, optimizer, scheduler = build_training(cfg, use_gpu=False)
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if kernel:  # as build_optimizer does on CUDA, and a NaN gradient in the second step
        for sub in subs:
            sub.moe_lab_master_adamw = master_adamw.MasterAdamW(sub)
        FaultInjector(Fault.parse("nan@grads:2"), config)
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    out = {"grad_norm": [], "launches": [], "optimizers": sorted({type(s).__name__ for s in subs})}
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = 8 // world  # tiny_moe: global batch 8 in micro-batches of 4
    after_first: list[torch.Tensor] = []
    for step in range(steps):
        first = step * 8 + rank * per_rank
        batches = [data.batch(list(range(m, m + 4))) for m in range(first, first + per_rank, 4)]
        metrics = trainer.step(step, batches)
        out["grad_norm"].append(metrics["grad_norm"])
        if step == 1:
            out["skipped"] = metrics.get("skipped") == 1.0
            out["skip_left_alone"] = all(torch.equal(a, b) for a, b in
                                         zip(snapshot(subs, model), after_first))
            out["steps_after_skip"] = sorted({float(s["step"]) for sub in subs
                                              for s in sub.optimizer.state.values()})
        if kernel and step != 1:
            out["launches"].append([id(launch) for sub in subs
                                    for launch in sub.moe_lab_master_adamw.launches.values()])
        if step == 0:
            out["masters"] = [p.detach().clone() for sub in subs
                              for g in sub.optimizer.param_groups for p in g["params"]]
            out["moments"] = [s[k].clone() for sub in subs for s in sub.optimizer.state.values()
                              for k in ("exp_avg", "exp_avg_sq")]
            pairs = [(copy, p) for sub in subs for g in sub.optimizer.param_groups
                     for p in g["params"]
                     if (copy := master_adamw.model_copies(sub)[id(p)]) is not None]
            out["copies"] = len(pairs)
            round_ = truncated if kernel else (lambda x: x.to(torch.bfloat16))
            out["copies_exact"] = all(torch.equal(c, round_(p.detach()).view(-1))
                                      for c, p in pairs)
            out["weights_same_on_every_rank"] = same_on_every_rank(model.parameters())
            after_first = snapshot(subs, model)
    out["steps"] = sorted({float(s["step"]) for sub in subs for s in sub.optimizer.state.values()})
    out["step_devices"] = sorted({s["step"].device.type for sub in subs
                                  for s in sub.optimizer.state.values()})
    return out


if __name__ == "__main__":
    tiny_moe, extra = sys.argv[1], sys.argv[2:]  # extra: config overrides
    enable_cpu_compat()
    init_distributed(C.load(tiny_moe, extra), detect_env(os.environ), use_gpu=False)
    ref = train(tiny_moe, kernel=False, steps=1, extra=extra)
    got = train(tiny_moe, kernel=True, steps=3, extra=extra)
    worst = torch.tensor([max_rel(got["masters"], ref["masters"]),
                          max_rel(got["moments"], ref["moments"]),
                          float(not got["copies_exact"]), float(not ref["copies_exact"]),
                          float(not got["weights_same_on_every_rank"])])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the worst rank decides
    if dist.get_rank() != 0:
        sys.exit(0)
    print(json.dumps({
        "world": dist.get_world_size(),
        "weights_same_on_every_rank": not bool(worst[4]),
        "optimizers": got["optimizers"],
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "grad_norm_step1": [ref["grad_norm"][0], got["grad_norm"][0]],
        "masters_max_rel": float(worst[0]),
        "moments_max_rel": float(worst[1]),
        "copies": [ref["copies"], got["copies"]],
        "copies_exact": [not bool(worst[3]), not bool(worst[2])],
        "launches_reused": got["launches"][0] == got["launches"][1] and bool(got["launches"][0]),
        "skipped_second_step": got["skipped"] and got["skip_left_alone"],
        "steps_after_skip": got["steps_after_skip"],
        "steps": got["steps"],
        "step_devices": got["step_devices"],
    }))
