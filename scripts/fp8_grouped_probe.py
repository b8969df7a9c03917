"""Does rowwise FP8 (`torch._scaled_grouped_mm`) pay for the torch backend's expert GEMMs?

Times, on one GPU, one MoE layer's expert GEMMs as moe_lab/experts/grouped.py runs them
(fc1 [E, 2F, H], fc2 [E, H, F], tokens grouped by expert) in bf16 `grouped_mm` against rowwise
FP8 e4m3 `_scaled_grouped_mm` with the quantisation included, for the three GEMMs of a training
step: forward (x @ W^T), data gradient (dy @ W) and weight gradient (dy_g^T @ x_g per expert).
Quantisation is plain PyTorch ("eager": what the backend could ship without a compiler) and
torch.compile'd ("compiled": a fused lower bound). Also the error of each FP8 result against bf16.

  python scripts/fp8_grouped_probe.py --out fp8_probe.json     (GPU with sm90; ~1 minute)
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max

# name: (routed token rows M = mbs x seq x top_k, experts E, hidden H, expert FFN F)
SHAPES = {
    "A_mbs1": (1 * 4096 * 4, 60, 2048, 1408),
    "A_mbs4": (4 * 4096 * 4, 60, 2048, 1408),
    "B_mbs2": (2 * 4096 * 8, 64, 3584, 2560),
    "B_mbs8": (8 * 4096 * 8, 64, 3584, 2560),
}


def quant_rows(x: torch.Tensor):
    """e4m3 with one scale per row (amax over the last dim); returns (x_fp8, dequant scale)."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).float()
    scale = FP8_MAX / amax.clamp(min=1e-12)
    x_fp8 = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_fp8, scale.reciprocal().squeeze(-1)


def quant_cols_per_group(x_MK: torch.Tensor, group_of_row: torch.Tensor, groups: int):
    """x^T [K, M] in e4m3, one scale per (group, column) over that group's rows: the layout the
    weight-gradient GEMM (2D x 2D, groups along the contraction) needs. Returns ([K, M], [G*K])."""
    amax = torch.zeros(groups, x_MK.shape[1], device=x_MK.device, dtype=torch.float32)
    amax.scatter_reduce_(0, group_of_row[:, None].expand_as(x_MK), x_MK.abs().float(), "amax")
    scale = FP8_MAX / amax.clamp(min=1e-12)
    x_fp8 = (x_MK.float() * scale[group_of_row]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_fp8.t().contiguous(), scale.reciprocal().reshape(-1)


def group_sizes(m: int, groups: int, align: int, gen: torch.Generator) -> torch.Tensor:
    """Uneven token counts per expert (a learned router's spread), each a multiple of `align`."""
    weights = torch.rand(groups, generator=gen) + 0.5
    sizes = (weights / weights.sum() * m / align).floor().long() * align
    sizes[-1] += m - sizes.sum()
    return sizes


def cuda_ms(fn, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def probe_gemm(x, w_ENK, offs, group_of_row, groups, q_rows, q_cols):
    """One GEMM y = x @ W_e^T per group, its dgrad and wgrad; bf16 vs FP8 (+ quantisation)."""
    n = w_ENK.shape[1]
    dy = torch.randn(x.shape[0], n, device=x.device, dtype=torch.bfloat16)
    bf16 = {
        "fwd": lambda: torch._grouped_mm(x, w_ENK.transpose(1, 2), offs=offs),
        "dgrad": lambda: torch._grouped_mm(dy, w_ENK, offs=offs),
        "wgrad": lambda: torch._grouped_mm(dy.t(), x, offs=offs),
    }

    def fp8_fwd(xq, xs, wq, ws):
        return torch._scaled_grouped_mm(xq, wq.transpose(1, 2), xs, ws, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=True)

    def fp8_dgrad(dyq, dys, wtq, wts):
        return torch._scaled_grouped_mm(dyq, wtq.transpose(1, 2), dys, wts, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=True)

    def fp8_wgrad(dytq, dyts, xtq, xts):
        return torch._scaled_grouped_mm(dytq, xtq.t(), dyts, xts, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=False)

    quant = {  # the quantised operands of each GEMM
        "fwd": lambda: (*q_rows(x), *q_rows(w_ENK)),
        "dgrad": lambda: (*q_rows(dy), *q_rows(w_ENK.transpose(1, 2).contiguous())),
        "wgrad": lambda: (*q_cols(dy, group_of_row, groups), *q_cols(x, group_of_row, groups)),
    }
    gemm = {"fwd": fp8_fwd, "dgrad": fp8_dgrad, "wgrad": fp8_wgrad}
    rows = {}
    for op in ("fwd", "dgrad", "wgrad"):
        ops = quant[op]()
        ref = bf16[op]()
        got = gemm[op](*ops)
        if op == "wgrad":  # [E*N, K] stacked per group in both
            got, ref = got.reshape(-1), ref.reshape(-1)
        rows[op] = {
            "bf16_ms": cuda_ms(bf16[op]),
            "fp8_gemm_ms": cuda_ms(lambda: gemm[op](*ops)),
            "quant_ms": cuda_ms(quant[op]),
            "fp8_rel_err": rel_err(got, ref),
        }
        rows[op]["fp8_total_ms"] = rows[op]["fp8_gemm_ms"] + rows[op]["quant_ms"]
    return rows


def probe_shape(m, experts, hidden, ffn, q_rows, q_cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = group_sizes(m, experts, 16, gen)
    offs = torch.cumsum(sizes, 0).to(torch.int32).cuda()
    group_of_row = torch.repeat_interleave(torch.arange(experts), sizes).cuda()
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, hidden, **dev)
    h = torch.randn(m, ffn, **dev)
    fc1 = torch.randn(experts, 2 * ffn, hidden, **dev) * hidden ** -0.5
    fc2 = torch.randn(experts, hidden, ffn, **dev) * ffn ** -0.5
    out = {"fc1": probe_gemm(x, fc1, offs, group_of_row, experts, q_rows, q_cols),
           "fc2": probe_gemm(h, fc2, offs, group_of_row, experts, q_rows, q_cols)}
    total = {k: sum(out[g][op][k] for g in out for op in out[g])
             for k in ("bf16_ms", "fp8_gemm_ms", "quant_ms", "fp8_total_ms")}
    fwd_dgrad = {k: sum(out[g][op][k] for g in out for op in ("fwd", "dgrad"))
                 for k in ("bf16_ms", "fp8_total_ms")}
    out["layer_fwd_bwd"] = {**total, "speedup_incl_quant": total["bf16_ms"] / total["fp8_total_ms"],
                            "speedup_gemm_only": total["bf16_ms"] / total["fp8_gemm_ms"]}
    out["layer_fp8_fwd_dgrad_only"] = {
        "bf16_ms": total["bf16_ms"],
        "mixed_ms": fwd_dgrad["fp8_total_ms"] + total["bf16_ms"] - fwd_dgrad["bf16_ms"],
    }
    out["layer_fp8_fwd_dgrad_only"]["speedup"] = (
        total["bf16_ms"] / out["layer_fp8_fwd_dgrad_only"]["mixed_ms"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fp8_probe.json")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    compiled = (torch.compile(quant_rows), torch.compile(quant_cols_per_group))
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in args.shapes.split(","):
        for mode, (q_rows, q_cols) in (("eager", (quant_rows, quant_cols_per_group)),
                                       ("compiled", compiled)):
            result = probe_shape(*SHAPES[name], q_rows, q_cols)
            report[f"{name}/{mode}"] = result
            layer, mixed = result["layer_fwd_bwd"], result["layer_fp8_fwd_dgrad_only"]
            errs = {f"{g}.{op}": round(result[g][op]["fp8_rel_err"], 4)
                    for g in ("fc1", "fc2") for op in ("fwd", "dgrad", "wgrad")}
            print(f"{name} {mode}: one layer's expert GEMMs fwd+bwd bf16 {layer['bf16_ms']:.2f} ms,"
                  f" fp8 {layer['fp8_gemm_ms']:.2f} + quant {layer['quant_ms']:.2f} ms ="
                  f" {layer['speedup_incl_quant']:.2f}x ({layer['speedup_gemm_only']:.2f}x GEMMs"
                  f" alone); fp8 fwd+dgrad, bf16 wgrad {mixed['speedup']:.2f}x; rel err {errs}",
                  flush=True)
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
