"""Measure `moe-lab upcycle` on a dense model of about 500 MB: peak resident memory of the
upcycling process and its children (sampled every 20 ms) against the sizes of the dense and the
upcycled weights. docs/upcycling.md quotes its output.

Run: PYTHONPATH=. python scripts/upcycle_memory.py [WORK_DIR] [upcycle flags ...]
(default flags: qwen2, 16 experts of 1024, top-4, shared expert 2048). Needs ~4 GB of memory
and ~3 GB of disk in WORK_DIR (default: a temporary directory, removed afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
# 4 layers, hidden 1024, SwiGLU 4096, vocab 32000: 126M parameters, 506 MB in fp32.
DENSE = ["model.hidden_size=1024", "model.num_attention_heads=16", "model.num_query_groups=4",
         "model.ffn_hidden_size=4096", "model.vocab_size=32000", "training.seq_length=32",
         "training.micro_batch_size=1", "training.global_batch_size=1",
         "training.max_steps=1", "optimizer.warmup_steps=0"]
UPCYCLE = ["--method", "qwen2", "--num-experts", "16", "--expert-ffn", "1024", "--topk", "4",
           "--shared-ffn", "2048", "--seed", "0"]


def run_sampled(command: list[str]) -> int:
    """Run `command`; return the peak of the summed RSS of it and its children."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1",
           "MOE_LAB_QUIET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, cwd=REPO)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(command)}")
    return peak


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    flags = sys.argv[2:] or UPCYCLE
    python = [sys.executable, "-m", "moe_lab"]
    dense_run, out = work / "dense", work / "moe"
    if not (dense_run / "checkpoints" / "latest").exists():
        run_sampled([*python, "train", "experiments/tiny_dense.yaml", "--run-dir",
                     str(dense_run), *DENSE])
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    peak_tree = run_sampled([*python, "upcycle", "--from", str(dense_run), "--to", str(out),
                             *flags])
    seconds = time.perf_counter() - started
    memory = json.loads((out / "upcycle_report.json").read_text())["memory"]
    mib = 2**20
    dense, moe = memory["dense_bytes"] / mib, memory["moe_bytes"] / mib
    own = (memory["peak_rss_bytes"] - memory["rss_before_reading_bytes"]) / mib
    print(f"dense weights {dense:.0f} MiB -> MoE weights {moe:.0f} MiB in {seconds:.0f} s")
    print(f"peak RSS of the process tree {peak_tree / mib:.0f} MiB; of the upcycling process "
          f"{memory['peak_rss_bytes'] / mib:.0f} MiB, of which {own:.0f} MiB above its "
          f"{memory['rss_before_reading_bytes'] / mib:.0f} MiB before reading the dense weights "
          f"({own / moe:.2f} x the MoE, {own / (dense + moe):.2f} x dense + MoE)")
    if len(sys.argv) <= 1:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
