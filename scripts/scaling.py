"""Expert-parallel scaling runs for any number of GPUs (or a CPU dry run with gloo ranks).

For each layout that fits N ranks (EP=N, EP x TP, PP=2 x EP, and one rank as the baseline) it
launches `torchrun --nproc-per-node R -m moe_lab train` with the same per-rank batch, then prints
tokens/s, MFU and weak-scaling efficiency against the one-rank run from each run's metrics.jsonl.

  python scripts/scaling.py --ranks 8                      # GPUs: Qwen2-57B-A14B layer shape
  python scripts/scaling.py --ranks 8 --cpu-dry-run        # CPU: tiny model, 8 gloo ranks
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (config and overrides, micro-batch size)
GPU_SHAPE = (["qwen2-57b-a14b", "training.seq_length=4096", "model.backend=torch",
              "training.precision=bf16"], 1)
CPU_SHAPE = ([str(REPO / "experiments" / "tiny_moe.yaml")], 2)


def layouts(ranks: int) -> dict[str, tuple[int, list[str]]]:
    found = {"single": (1, [])}
    if ranks >= 2:
        found[f"ep{ranks}"] = (ranks, [f"parallel.ep={ranks}"])
    if ranks >= 4:
        found[f"ep{ranks // 2}_tp2"] = (ranks, [f"parallel.ep={ranks // 2}", "parallel.tp=2"])
        found[f"pp2_ep{ranks // 2}"] = (ranks, ["parallel.pp=2", f"parallel.ep={ranks // 2}"])
    return found


def run(name: str, nproc: int, overrides: list[str], shape: tuple, steps: int, out: Path,
        micro_batches: int) -> dict:
    """Same micro-batch size and micro-batches per data-parallel rank in every layout."""
    run_dir = out / name
    out.mkdir(parents=True, exist_ok=True)
    config_args, mbs = shape
    dp = nproc // _model_parallel(overrides)
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "-m", "moe_lab", "train", *config_args, *overrides, "--run-dir", str(run_dir),
            f"training.max_steps={steps}", "training.log_interval=1", "checkpoint.enabled=false",
            "tracking.enabled=false", f"training.micro_batch_size={mbs}",
            f"training.global_batch_size={mbs * micro_batches * dp}", "optimizer.warmup_steps=0"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        (out / f"{name}.stderr.txt").write_text(result.stderr)
        return {"layout": name, "ranks": nproc, "error": result.stderr.strip().splitlines()[-1]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[len(rows) // 3:]
    return {"layout": name, "ranks": nproc, "loss_last": rows[-1]["loss"],
            "tokens_per_s": statistics.median(r["throughput/tokens_per_s"] for r in timed),
            "mfu": statistics.median(r.get("throughput/mfu", 0.0) for r in timed)}


def _model_parallel(overrides: list[str]) -> int:
    size = 1
    for item in overrides:
        key, value = item.split("=")
        if key in ("parallel.tp", "parallel.pp"):
            size *= int(value)
    return size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, required=True, help="GPUs (or CPU ranks) to use")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model, gloo, on the CPU")
    parser.add_argument("--steps", type=int, default=12, help="steps per run")
    parser.add_argument("--layers", type=int, default=4,
                        help="GPU shape: layers of Qwen2-57B-A14B to keep (as many as fit)")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per DP rank")
    parser.add_argument("--out", default="runs/scaling", help="run directories and results.json")
    args = parser.parse_args()
    out = Path(args.out)
    shape = CPU_SHAPE if args.cpu_dry_run else (
        [*GPU_SHAPE[0], f"model.num_layers={args.layers}"], GPU_SHAPE[1])
    results = [run(name, n, o, shape, args.steps, out, args.micro_batches)
               for name, (n, o) in layouts(args.ranks).items()]
    base = results[0].get("tokens_per_s")
    print("| layout | ranks | tokens/s | MFU | weak-scaling efficiency | last loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['layout']} | {r['ranks']} | failed: {r['error']} |")
            continue
        eff = r["tokens_per_s"] / (base * r["ranks"]) if base else float("nan")
        print(f"| {r['layout']} | {r['ranks']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
              f"{eff:.0%} | {r['loss_last']:.4f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
