"""Which of torch's scaled_dot_product_attention kernels is fastest at the bench shapes?

Times causal SDPA forward + backward in bf16, one call per kernel torch offers (flash, cuDNN,
memory-efficient), at shape A (Qwen1.5-MoE-A2.7B: 16 query and 16 key/value heads of 128) and
shape B (Qwen2-57B-A14B: 28 query heads, 4 key/value heads, `enable_gqa`), seq 4096, at the
micro-batches the bench uses, and compares each kernel's output and gradients with flash's (the
kernel torch picks by default on an H200). A kernel that refuses a shape is reported with its
reason. Prints JSON.

  python scripts/sdpa_probe.py --out sdpa_probe.json [--import-te]    (one GPU; ~1 minute)

`--import-te` imports Transformer Engine first. On the device TE then loads a cuDNN
(9.14) beside torch's (9.19), also with CUDNN_PATH pointing at torch's; torch's version check then
fails and its default choice falls back to flash, while an explicit request for cuDNN's kernel
still runs (docs/performance.md, twelfth session).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe_lab.bench.report import print_and_save
from moe_lab.bench.timing import cuda_event_ms

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}
# name: (micro-batch, query heads, key/value heads); head dim 128, seq 4096
SHAPES = {"A_mbs1": (1, 16, 16), "A_mbs4": (4, 16, 16), "B_mbs2": (2, 28, 4),
          "B_mbs8": (8, 28, 4)}
SEQ, HEAD_DIM = 4096, 128


def _inputs(batch: int, heads: int, kv_heads: int):
    """q, k, v [b, n, s, d] as SDPACoreAttention makes them: permuted views of [s, b, n, d]."""
    def make(n):
        t = torch.randn(SEQ, batch, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        return t.permute(1, 2, 0, 3).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads)


def _run(kernel, q, k, v, grad_out):
    with sdpa_kernel([kernel]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=k.shape[1] != q.shape[1])
    q.grad = k.grad = v.grad = None
    out.backward(grad_out)
    return out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()


def _default_kernels(q, k, v, grad_out) -> list[str]:
    """The GPU kernels torch's own choice runs (no sdpa_kernel context)."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        q.grad = k.grad = v.grad = None
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=k.shape[1] != q.shape[1])
        out.backward(grad_out)

    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if e.device_time_total > 0}
    return sorted(n[:90] for n in names if "sdpa" in n.lower() or "flash" in n.lower()
                  or "fmha" in n.lower() or "attention" in n.lower())


def probe_shape(batch: int, heads: int, kv_heads: int) -> dict:
    torch.manual_seed(0)
    q, k, v = _inputs(batch, heads, kv_heads)
    grad_out = torch.randn(batch, heads, SEQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    flops = 4 * batch * heads * SEQ * SEQ * HEAD_DIM / 2 * 3.5  # causal; backward 2.5x forward
    reference = _run(KERNELS["flash"], q, k, v, grad_out)
    rows = {"default_kernels": _default_kernels(q, k, v, grad_out)}
    for name, kernel in KERNELS.items():
        try:
            result = _run(kernel, q, k, v, grad_out)
        except RuntimeError as error:  # the kernel does not take this shape
            rows[name] = {"error": str(error).splitlines()[0][:200]}
            continue
        ms = cuda_event_ms(lambda: _run(kernel, q, k, v, grad_out), repeat=10)
        diffs = [(a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                 for a, b in zip(result, reference)]
        rows[name] = {"fwd_bwd_ms": ms, "tflops": flops / ms / 1e9,
                      "max_rel_diff_to_flash": dict(zip(("out", "dq", "dk", "dv"), diffs))}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--import-te", action="store_true",
                        help="import transformer_engine.pytorch first (as moe-lab does with TE)")
    args = parser.parse_args()
    if args.import_te:
        import transformer_engine.pytorch  # noqa: F401
    try:
        cudnn = torch.backends.cudnn.version()
    except RuntimeError as error:  # TE loaded another cuDNN than torch's
        cudnn = str(error).splitlines()[0][:200]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": cudnn, "te_imported": args.import_te,
              "CUDNN_PATH": os.environ.get("CUDNN_PATH"),
              "cudnn_sdp_enabled": torch.backends.cuda.cudnn_sdp_enabled(),
              "shapes": {name: probe_shape(*shape) for name, shape in SHAPES.items()}}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
