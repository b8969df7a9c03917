"""Does Python's garbage collector stall back-to-back training steps? Times one `moe-lab bench`
variant's steps back to back with the collector on (every collection's generation and pause
recorded through gc.callbacks) and then with it off, and prints both as JSON. On the GPU:

    python scripts/gc_probe.py --preset qwen1.5-moe-a2.7b --layers 4 --mbs 4 --out gc.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from moe_lab import config as config_lib
from moe_lab.bench import mcore
from moe_lab.launch.distributed import detect_env, init_distributed, shutdown_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen1.5-moe-a2.7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--variant", default="mcore_torch_bf16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cfg = config_lib.load(args.preset, mcore.shape_overrides(args.layers, args.seq, args.mbs))
    init_distributed(cfg, detect_env({}), use_gpu=True)
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def record(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], (time.perf_counter() - started[0]) * 1e3))

    try:
        step, _ = mcore.build_step(cfg, args.variant, torch.device("cuda"))
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        gc.callbacks.append(record)
        result = {}
        for mode in ("collector_on", "collector_off"):
            if mode == "collector_off":
                gc.collect()
                gc.disable()
            pauses.clear()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            result[mode] = {
                "ms_per_step": (time.perf_counter() - start) / args.steps * 1e3,
                "collections_by_generation": {g: sum(1 for gen, _ in pauses if gen == g)
                                              for g in (0, 1, 2)},
                "pause_ms_total": sum(ms for _, ms in pauses),
                "pause_ms_max": max((ms for _, ms in pauses), default=0.0)}
            print(mode, json.dumps(result[mode]), flush=True)
        gc.enable()
    finally:
        if record in gc.callbacks:
            gc.callbacks.remove(record)
        shutdown_distributed()
    result.update(variant=args.variant, preset=args.preset, layers=args.layers, mbs=args.mbs,
                  steps=args.steps, tracked_objects=len(gc.get_objects()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
