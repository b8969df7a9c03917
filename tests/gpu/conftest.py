"""GPU tests: run with `pytest tests/gpu` on a machine with CUDA GPUs; elsewhere every test is
skipped with the reason. Measurements are printed and, when MOE_LAB_GPU_REPORT names a folder,
written there as JSON."""

import json
import os
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA GPU(s), found {GPUS}")


def report(name: str, data: dict) -> None:
    print(f"\n{name}: {json.dumps(data, indent=1)}")
    folder = os.environ.get("MOE_LAB_GPU_REPORT")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(data, indent=1))
