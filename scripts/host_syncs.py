"""Where a training step makes the host wait for the GPU: one warmed-up step of a `moe-lab bench`
variant under torch.cuda.set_sync_debug_mode("warn"), each synchronising call's Python
file:line with its count. On the GPU machine:

    python scripts/host_syncs.py --preset qwen1.5-moe-a2.7b --layers 2 --variant mcore_torch_bf16
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch

from moe_lab import config as config_lib
from moe_lab.bench import mcore
from moe_lab.launch.distributed import detect_env, init_distributed, shutdown_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen1.5-moe-a2.7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--variant", default="mcore_torch_bf16")
    args = parser.parse_args()
    kind, *overrides = args.variant.split("+")
    shape = mcore.shape_overrides(args.layers, args.seq, args.mbs)
    cfg = config_lib.load(args.preset, shape + overrides)
    init_distributed(cfg, detect_env({}), use_gpu=True)
    try:
        step, _ = mcore.build_step(cfg, kind, torch.device("cuda"))
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode("default")
    finally:
        shutdown_distributed()
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    print(f"{args.variant}: {sum(where.values())} synchronising calls in one step")
    for place, count in where.most_common():
        print(f"{count:4d}  {place}")


if __name__ == "__main__":
    main()
