"""The GPTModel that dense weights are read into and MoE weights are written from.

Always one process (TP = PP = EP = 1), fp32, megatron's local modules: dist_checkpointing
re-shards the saved tensors into any layout and casts them to the run's precision when
`moe-lab train` loads them. Weights are not initialised: every one is overwritten (the writer
checks that none is left).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt import GPTModel

from moe_lab.config import ExperimentConfig, ParallelConfig
from moe_lab.model import build_model, build_transformer_config


def single_process(cfg: ExperimentConfig) -> ExperimentConfig:
    return dataclasses.replace(
        cfg, parallel=ParallelConfig(),
        model=dataclasses.replace(cfg.model, backend="local"),
        training=dataclasses.replace(cfg.training, precision="fp32"))


def build_uninitialised(cfg: ExperimentConfig) -> GPTModel:
    """Needs a world of one with megatron's parallel state set up (moe_lab.launch does it)."""
    cfg = single_process(cfg)
    config = build_transformer_config(cfg, use_cpu_initialization=True)
    config.perform_initialization = False  # allocated, never drawn: all of it is overwritten
    return build_model(cfg, config)


def tensors_of(model) -> dict:
    """The model's state-dict tensors (sharing storage with its parameters and buffers)."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
