"""GPU probe for train/master_adamw.py: the fp32-master AdamW update of shape A's largest
tensors timed as torch's fused AdamW + a copy into bf16 (megatron's step), as the kernel with
several block sizes and warp counts, and as the same arithmetic on one flat buffer with plain
pointer arguments (what Triton reaches without address tables). Prints JSON.

With `--state bf16`: the precision-aware optimizer's layout instead (fp32 master weights, bf16
gradients and moments, the bf16 weight written: 20 bytes a parameter) at several block sizes and
warp counts, the same with the master weight as the bf16 weight + int16 remainders (megatron's
default store_param_remainders: 18 bytes), a bf16 copy of the gradients (what the memory system
gives a plain copy), and the gradients' sum of squares by torch's `_foreach_norm` and by
train/grad_norm.py's kernel.

Run on a GPU: python scripts/adamw_probe.py [--state fp32|bf16] [--out probe.json]
"""

import argparse
import math

import torch
import triton
import triton.language as tl

from moe_lab.bench.report import print_and_save
from moe_lab.bench.timing import cuda_event_ms
from moe_lab.train import master_adamw as M

NUMELS = [151936 * 2048, 60 * 2 * 1408 * 2048, 60 * 1408 * 2048, 2048 * 2048, 4097, 1]
HYPER = dict(lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)


@triton.jit
def _flat_kernel(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, n, grad_scale, lr_decay, beta1, beta2, eps,
                 step_size, bc2_sqrt, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    M._adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, offsets, n, grad_scale, lr_decay, beta1,
                   beta2, eps, step_size, bc2_sqrt, True, True, True, False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--state", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    if args.state == "bf16":
        return probe_bf16_state(args)
    params = sum(NUMELS)
    scale = torch.tensor([2.0], device="cuda")
    step = 3
    scalars = dict(step_size=HYPER["lr"] / (1 - HYPER["beta1"] ** step),
                   bc2_sqrt=math.sqrt(1 - HYPER["beta2"] ** step))
    rows = {}

    def fresh():
        return ([torch.randn(n, device="cuda") for n in NUMELS] for _ in range(4))

    # megatron's step: torch's fused AdamW, then the copy
    ps, gs, _, _ = fresh()
    ref = [torch.nn.Parameter(p) for p in ps]
    for r, g in zip(ref, gs):
        r.grad = g
    adamw = torch.optim.AdamW(ref, lr=HYPER["lr"], betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=0.1, fused=True)
    adamw.grad_scale = scale
    copies = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for n in NUMELS]

    def torch_step():
        adamw.step()
        torch._foreach_copy_(copies, [r.detach() for r in ref])

    rows["torch_fused_adamw+copy"] = cuda_event_ms(torch_step)
    del ref, adamw, ps, gs
    torch.cuda.empty_cache()

    ps, gs, ms, vs = fresh()
    for m, v in zip(ms, vs):
        m.zero_(), v.zero_()
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8),
                         (8192, 16)):
        launch = M._build_launch(None, [ps, gs, ms, vs, copies], "cuda", block=block)
        rows[f"kernel_block{block}_warps{warps}"] = cuda_event_ms(lambda: M.update(
            launch, scale, **HYPER, **scalars, num_warps=warps))
        aligned = launch.aligned
    del ps, gs, ms, vs
    torch.cuda.empty_cache()

    flat = [torch.randn(params, device="cuda") for _ in range(4)]
    out = torch.empty(params, device="cuda", dtype=torch.bfloat16)
    for block, warps in ((2048, 4), (4096, 8)):
        rows[f"flat_block{block}_warps{warps}"] = cuda_event_ms(lambda: _flat_kernel[
            (math.ceil(params / block),)](*flat, out, params, scale, 3e-5, 0.9, 0.95, 1e-8,
                                          scalars["step_size"], scalars["bc2_sqrt"], BLOCK=block,
                                          num_warps=warps))
    result = {"params": params, "aligned": aligned, "ms": rows,
              "GBps": {k: (34 if k.startswith("torch") else 30) * params / v / 1e6
                       for k, v in rows.items()}}
    print_and_save(result, args.out)


def probe_bf16_state(args) -> None:
    from moe_lab.train.grad_norm import SquareSum

    params = sum(NUMELS)
    scale = torch.tensor([2.0], device="cuda")
    scalars = dict(step_size=HYPER["lr"] / (1 - HYPER["beta1"] ** 3),
                   bc2_sqrt=math.sqrt(1 - HYPER["beta2"] ** 3))
    masters = [torch.randn(n, device="cuda") for n in NUMELS]
    grads, exp_avgs, exp_avg_sqs, weights = (
        [torch.randn(n, device="cuda").to(torch.bfloat16) for n in NUMELS] for _ in range(4))
    for v in exp_avg_sqs:
        v.abs_()
    rows, bytes_per = {}, {}
    for block, warps in ((128, 1), (256, 1), (256, 2), (256, 4), (512, 1), (512, 2), (512, 4),
                         (512, 8), (1024, 2), (1024, 4), (1024, 8), (2048, 8)):
        launch = M._build_launch(None, [masters, grads, exp_avgs, exp_avg_sqs, weights], "cuda",
                                 block=block)
        name = f"adamw_block{block}_warps{warps}"
        rows[name] = cuda_event_ms(lambda: M.update(launch, scale, **HYPER, **scalars,
                                                    num_warps=warps))
        bytes_per[name] = 20
    # megatron's default store_param_remainders: the master as the weight + int16 remainders
    remainders = [torch.randint(-2**15, 2**15, (n,), device="cuda", dtype=torch.int16)
                  for n in NUMELS]
    for block, warps in ((128, 1), (256, 1), (256, 2), (512, 1), (512, 2), (1024, 4)):
        launch = M._build_launch(None, [remainders, grads, exp_avgs, exp_avg_sqs, weights],
                                 "cuda", block=block)
        name = f"remainders_block{block}_warps{warps}"
        rows[name] = cuda_event_ms(lambda: M.update(launch, scale, **HYPER, **scalars,
                                                    num_warps=warps))
        bytes_per[name] = 18
    del remainders
    copies = [torch.empty_like(g) for g in grads]
    rows["bf16_copy"] = cuda_event_ms(lambda: torch._foreach_copy_(copies, grads))
    bytes_per["bf16_copy"] = 4
    copies.clear()  # free before the norm rows
    rows["foreach_norm_fp32"] = cuda_event_ms(
        lambda: torch._foreach_norm(grads, 2, dtype=torch.float32))
    bytes_per["foreach_norm_fp32"] = 2
    sums = {}
    for block, warps in ((1024, 2), (2048, 2), (2048, 4), (4096, 2), (4096, 4), (8192, 4),
                         (8192, 8)):
        square_sum = SquareSum(block=block, num_warps=warps)
        name = f"norm_block{block}_warps{warps}"
        rows[name] = cuda_event_ms(lambda: square_sum(grads))
        bytes_per[name] = 2
        sums[name] = float(square_sum(grads))
    want = float(sum(g.double().square().sum() for g in grads))
    result = {"params": params, "ms": rows,
              "GBps": {k: bytes_per[k] * params / v / 1e6 for k, v in rows.items()},
              "norm_rel_err": {k: abs(v - want) / want for k, v in sums.items()}}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
