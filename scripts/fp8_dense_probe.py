"""How much could FP8 take off the dense GEMMs of shape A at micro-batch 4, at best?

Times, on one GPU, every dense GEMM of one Qwen1.5-MoE-A2.7B layer's training step at 16,384
tokens (attention QKV and output projections, the shared expert's two), and the LM head's, each
as forward (x @ W^T), data gradient (dy @ W) and weight gradient (dy^T @ x): bf16 `torch.mm`
against e4m3 `torch._scaled_mm` with one scale per tensor and with one per row / column. The FP8
operands are made before the timing: no quantisation, no transposed copies, so the FP8 numbers
are a lower bound of what any FP8 recipe can spend on these GEMMs. scripts/fp8_grouped_probe.py
does the same for the routed experts' grouped GEMMs. Prints JSON.

  python scripts/fp8_dense_probe.py --out fp8_dense_probe.json     (GPU with sm90; ~1 minute)
"""

from __future__ import annotations

import argparse

import torch

from moe_lab.bench.report import print_and_save
from moe_lab.bench.timing import cuda_event_ms

FP8 = torch.float8_e4m3fn
TOKENS = 4 * 4096  # A at micro-batch 4
HIDDEN, QKV, SHARED_FFN, VOCAB, LAYERS = 2048, 3 * 2048, 5632, 151936, 4
# name: (in features K, out features N, how many per step)
GEMMS = {
    "attention_qkv": (HIDDEN, QKV, LAYERS),
    "attention_out": (HIDDEN, HIDDEN, LAYERS),
    "shared_fc1": (HIDDEN, 2 * SHARED_FFN, LAYERS),
    "shared_fc2": (SHARED_FFN, HIDDEN, LAYERS),
    "lm_head": (HIDDEN, VOCAB, 1),
}


def _fp8_operands(a: torch.Tensor, b: torch.Tensor, rowwise: bool):
    """a [M, K] row-major and b [K, N] column-major in e4m3, with their dequantisation scales."""
    m, n = a.shape[0], b.shape[1]
    b_cm = b.t().contiguous().to(FP8).t()
    if rowwise:
        return (a.to(FP8), b_cm, torch.ones(m, 1, device=a.device),
                torch.ones(1, n, device=a.device))
    one = torch.ones((), device=a.device)
    return a.to(FP8), b_cm, one, one


def time_gemm(m: int, k: int, n: int) -> dict[str, float]:
    """[m, k] @ [k, n]: bf16 and FP8 (tensorwise and rowwise scales), ms."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    out = {"bf16": cuda_event_ms(lambda: torch.mm(a, b))}
    for name, rowwise in (("fp8_tensorwise", False), ("fp8_rowwise", True)):
        a8, b8, sa, sb = _fp8_operands(a, b, rowwise)
        out[name] = cuda_event_ms(lambda: torch._scaled_mm(a8, b8, sa, sb,
                                                           out_dtype=torch.bfloat16))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows, totals = {}, {"bf16": 0.0, "fp8_tensorwise": 0.0, "fp8_rowwise": 0.0}
    for name, (k, n, count) in GEMMS.items():
        # forward x[T,K] W^T, data gradient dy[T,N] W, weight gradient dy^T[N,T] x[T,K]
        for part, (mm, kk, nn) in (("fwd", (TOKENS, k, n)), ("dgrad", (TOKENS, n, k)),
                                   ("wgrad", (n, TOKENS, k))):
            ms = time_gemm(mm, kk, nn)
            ms["tflops_bf16"] = 2 * mm * kk * nn / ms["bf16"] / 1e9
            rows[f"{name}.{part}"] = ms
            for key in totals:
                totals[key] += count * ms[key]
    best = min(totals["fp8_tensorwise"], totals["fp8_rowwise"])
    result = {"tokens": TOKENS, "layers": LAYERS, "per_gemm_ms": rows,
              "step_dense_gemm_ms": totals,
              "fp8_saving_ms_at_best": totals["bf16"] - best,
              "gpu": torch.cuda.get_device_name()}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
