"""Where the dense model comes from: a moe-lab run or checkpoint directory, or (hook) a Hugging
Face Qwen2 directory.

Opening a source reads only its config, so every setting can be checked before any weight is
read; `read()` then returns the dense tensors by GPTModel.state_dict() name.

Hook for Hugging Face directories (a `config.json` inside): `moe_lab.convert` (the HF issue)
is expected to provide `read_dense_config(hf_dir) -> ExperimentConfig` (a dense config whose
`model` section describes the checkpoint) and `read_dense_tensors(hf_dir) -> dict[str, Tensor]`
(fp32 or bf16 tensors named and laid out as GPTModel.state_dict()'s, e.g.
`decoder.layers.0.mlp.linear_fc1.weight` = [gate; up] on dim 0). Until it exists such a
directory is refused with a one-line error.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moe_lab import config as config_lib
from moe_lab.config import ConfigError, ExperimentConfig
from moe_lab.train.checkpoint import latest_checkpoint, load_checkpoint
from moe_lab.upcycle.template import build_uninitialised, tensors_of

HF_HOOK = ("moe_lab.convert", "read_dense_config", "read_dense_tensors")


@dataclass(frozen=True)
class DenseSource:
    path: Path
    config: ExperimentConfig
    config_file: Path | None  # the dense run's resolved config.yaml, when there is one
    checkpoint: Path | None  # the dist_checkpointing directory, for moe-lab sources
    read: Callable[[], dict[str, torch.Tensor]]


def open_dense(path: str | Path) -> DenseSource:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"upcycle.source: {path} is not a directory", key="upcycle.source")
    if (path / "config.json").is_file():
        return _hugging_face(path)
    run_dir, checkpoint = _moe_lab_layout(path)
    config_file = run_dir / "config.yaml"
    dense = config_lib.load(config_file)
    if dense.moe.enabled:
        raise ConfigError(f"upcycle.source: {path} holds a MoE model (moe.num_experts "
                          f"{dense.moe.num_experts} in {config_file}); upcycling starts from a "
                          f"dense one", key="upcycle.source")
    return DenseSource(path, dense, config_file, checkpoint,
                       read=lambda: _read_moe_lab(dense, checkpoint))


def _moe_lab_layout(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory or one of its checkpoints."""
    if (path / "config.yaml").is_file():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(f"upcycle.source: run directory {path} has no checkpoint "
                              f"(checkpoints/latest)", key="upcycle.source")
        return path, checkpoint
    run_dir = path.parent.parent
    if (path / "metadata.json").is_file() and (run_dir / "config.yaml").is_file():
        return run_dir, path
    raise ConfigError(f"upcycle.source: {path} is neither a moe-lab run directory (config.yaml "
                      f"and checkpoints/latest), one of its checkpoints/step_N directories, nor a "
                      f"Hugging Face directory (config.json)", key="upcycle.source")


def _read_moe_lab(dense: ExperimentConfig, checkpoint: Path) -> dict[str, torch.Tensor]:
    model = build_uninitialised(dense)
    load_checkpoint(checkpoint, model)
    return tensors_of(model)  # the model itself is dropped: these share its storage


def _hugging_face(path: Path) -> DenseSource:
    module_name = HF_HOOK[0]
    try:
        module = importlib.import_module(module_name)
        read_config, read_tensors = (getattr(module, name) for name in HF_HOOK[1:])
    except (ImportError, AttributeError):
        raise ConfigError(f"upcycle.source: {path} is a Hugging Face directory; reading it needs "
                          f"{module_name}.{HF_HOOK[1]} and .{HF_HOOK[2]} (the Hugging Face "
                          f"conversion), which this installation does not have yet",
                          key="upcycle.source") from None
    return DenseSource(path, read_config(path), None, None, read=lambda: read_tensors(path))
