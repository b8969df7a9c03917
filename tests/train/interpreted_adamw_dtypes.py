"""Run by tests/train/test_master_adamw.py in a child process with TRITON_INTERPRET=1: one launch
of train/master_adamw.py's kernel over fp32 master weights with bf16 gradients and bf16 moments
(the precision-aware optimizer's layout), against torch's AdamW on fp32 copies of the same
numbers, and the same launch with the master weights kept as bf16 weights + int16 remainders
(store_param_remainders), against the fp32 master weights' launch; prints what the test compares
as JSON."""

import json
import math

import torch

from moe_lab.train import master_adamw, master_remainders

LR, WD, BETAS, EPS, STEP, CLIP_SCALE = 1e-2, 0.1, (0.9, 0.95), 1e-8, 3, 2.0


def bf16_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error of a bf16 result against fp32, relative to the value (floored at a
    thousandth of the tensor's largest, where fp32 rounding moves values near zero)."""
    err = (got.float() - want).abs()
    return float((err / (want.abs() + 1e-3 * want.abs().max())).max())


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> int:
    """Largest distance in bf16 steps (the interpreter truncates where the GPU rounds)."""
    as_int = lambda x: x.to(torch.bfloat16).view(torch.int16).to(torch.int32)  # noqa: E731
    return int((as_int(got) - as_int(want)).abs().max())


def main() -> None:
    torch.manual_seed(0)
    sizes = (3000, 1024, 17)  # a partial last block, a whole block, a tensor under one block
    master = [torch.randn(n) for n in sizes]
    grad = [torch.randn(n).to(torch.bfloat16) for n in sizes]
    exp_avg = [(0.1 * torch.randn(n)).to(torch.bfloat16) for n in sizes]
    exp_avg_sq = [(0.01 * torch.rand(n)).to(torch.bfloat16) for n in sizes]
    copy = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
    start = [t.clone() for t in master + exp_avg + exp_avg_sq]

    # torch's AdamW, in fp32, from the same numbers; the clipping divides the gradient
    ref = [torch.nn.Parameter(m.clone()) for m in master]
    adamw = torch.optim.AdamW(ref, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for p, g, m, v in zip(ref, grad, exp_avg, exp_avg_sq):
        p.grad = g.float() / CLIP_SCALE
        adamw.state[p] = {"step": torch.tensor(float(STEP - 1)), "exp_avg": m.float(),
                          "exp_avg_sq": v.float()}
    adamw.step()

    roles = [master, grad, exp_avg, exp_avg_sq, copy]
    launch = master_adamw._build_launch((), roles, torch.device("cpu"))
    kwargs = dict(lr=LR, weight_decay=WD, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                  step_size=LR / (1 - BETAS[0] ** STEP), bc2_sqrt=math.sqrt(1 - BETAS[1] ** STEP))
    before = [t.clone() for t in master + exp_avg]
    master_adamw.update(launch, torch.tensor(CLIP_SCALE), torch.tensor(1.0), **kwargs)
    skipped = all(torch.equal(a, b) for a, b in zip(before, master + exp_avg))
    master_adamw.update(launch, torch.tensor(CLIP_SCALE), torch.tensor(0.0), **kwargs)
    remainders = remainders_launch(start, grad, kwargs)

    print(json.dumps({
        "bf16_roles": list(launch.bf16),
        "skipped": skipped,
        "master_max_rel": max(float((m - p.detach()).abs().max() / p.detach().abs().max())
                              for m, p in zip(master, ref)),
        "exp_avg_rel": max(bf16_rel(m, adamw.state[p]["exp_avg"])
                           for m, p in zip(exp_avg, ref)),
        "exp_avg_sq_rel": max(bf16_rel(v, adamw.state[p]["exp_avg_sq"])
                              for v, p in zip(exp_avg_sq, ref)),
        "copy_ulps": max(bf16_ulps(c, m) for c, m in zip(copy, master)),
        "moments_changed": all(not torch.equal(a, b) for a, b in zip(before[3:], exp_avg)),
        "remainders": {
            "launch": remainders["launch"], "skipped": remainders["skipped"],
            # the same fp32 numbers as the fp32 master weights' launch, bit for bit
            "master_equal": all(torch.equal(master_remainders.join(w, r), m) for w, r, m in
                                zip(remainders["weights"], remainders["rems"], master)),
            "split_equal": all(torch.equal(w, ws) and torch.equal(r, rs) for w, r, (ws, rs) in
                               zip(remainders["weights"], remainders["rems"],
                                   map(master_remainders.split, master))),
            "moments_equal": all(torch.equal(a, b) for a, b in
                                 zip(remainders["moments"], exp_avg + exp_avg_sq)),
        },
    }))


def remainders_launch(start, grad, kwargs) -> dict:
    """One launch on the remainders layout, from the fp32 launch's starting numbers."""
    n = len(grad)
    master, moments = start[:n], [t.clone() for t in start[n:]]
    weights, rems = map(list, zip(*(master_remainders.split(m) for m in master)))
    roles = [rems, grad, moments[:n], moments[n:], weights]
    launch = master_adamw._build_launch((), roles, torch.device("cpu"))
    before = [t.clone() for t in rems + weights + moments]
    master_adamw.update(launch, torch.tensor(CLIP_SCALE), torch.tensor(1.0), **kwargs)
    skipped = all(torch.equal(a, b) for a, b in zip(before, rems + weights + moments))
    master_adamw.update(launch, torch.tensor(CLIP_SCALE), torch.tensor(0.0), **kwargs)
    return {"launch": [launch.remainders, launch.bf16[0]], "skipped": skipped,
            "weights": weights, "rems": rems, "moments": moments}


if __name__ == "__main__":
    main()
