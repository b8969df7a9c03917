"""The bench table: tokens/s, model TFLOP/s, MFU, memory, step/isolated/GPU/host time, and
ratios of every row to each transformers baseline measured in the same run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from moe_lab.bench.timing import StepTiming


@dataclass(frozen=True)
class BenchRow:
    name: str
    tokens_per_s: float
    tflops: float
    mfu: float
    timing: StepTiming
    error: str | None = None


def make_row(name: str, timing: StepTiming, tokens_per_step: int, flops_per_token: float,
             peak_tflops: float) -> BenchRow:
    """tokens/s from the steps back to back, as training runs them (timing.py)."""
    tokens_per_s = tokens_per_step / (timing.steady_ms / 1e3)
    tflops = tokens_per_s * flops_per_token / 1e12
    return BenchRow(name, tokens_per_s, tflops, tflops / peak_tflops, timing)


def render(rows: list[BenchRow]) -> str:
    baselines = [r for r in rows if r.name.startswith("hf_") and r.error is None]
    head = ["variant", "tokens/s", "TFLOP/s", "MFU", "peak GB", "step ms", "isolated ms",
            "GPU ms", "host ms"]
    head += [f"x {b.name}" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error} |")
            continue
        t = r.timing
        cells = [r.name, f"{r.tokens_per_s:,.0f}", f"{r.tflops:.1f}", f"{r.mfu:.1%}",
                 f"{t.peak_gb:.1f}", f"{t.steady_ms:.1f}", f"{t.wall_ms:.1f}", f"{t.gpu_ms:.1f}",
                 f"{t.host_ms:.1f}"]
        cells += [f"{r.tokens_per_s / b.tokens_per_s:.2f}" for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def from_json(rows: list[dict]) -> list[BenchRow]:
    return [BenchRow(**(r | {"timing": StepTiming(**r["timing"]) if r["timing"] else None}))
            for r in rows]


def print_and_save(result: dict, out: str | None) -> None:
    """A probe's result (scripts/*_probe.py): printed as JSON, and written to `out` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
