"""A dense Hugging Face Qwen2 directory as an upcycling source (`moe-lab upcycle --from HF_DIR`).

moe_lab.upcycle.source calls these two through its Hugging Face hook: the experiment config the
directory describes, then its weights named and laid out as a single-process GPTModel's
state_dict() (fp32, local modules, QKV grouped and [gate; up] stacked as megatron holds them).
The weights go through the same checked mapping as `convert hf-to-mcore`, into a model built
here, so nothing is mapped twice. Errors are ConfigErrors on `upcycle.source`, one line each.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moe_lab.config import ConfigError, ExperimentConfig, ParallelConfig
from moe_lab.convert.errors import ConversionError
from moe_lab.convert.hf_to_mcore import ImportPlan, element_reader, plan_import

_KEY = "upcycle.source"


def read_dense_config(hf_dir: str | Path) -> ExperimentConfig:
    """The dense experiment of HF_DIR (data.tokenizer: HF_DIR when it has tokenizer files)."""
    return _dense_plan(hf_dir).cfg


def read_dense_tensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """HF_DIR's weights by GPTModel.state_dict() name. Needs a world of one with megatron's
    parallel state (moe_lab.launch sets it up for upcycling)."""
    from moe_lab.convert.mcore_files import fill_model
    from moe_lab.model import build_model, build_transformer_config

    plan = _dense_plan(hf_dir)
    cfg = dataclasses.replace(
        plan.cfg, parallel=ParallelConfig(),
        training=dataclasses.replace(plan.cfg.training, precision="fp32"))
    config = build_transformer_config(cfg, use_cpu_initialization=True)
    config.perform_initialization = False  # every weight is overwritten (fill_model checks)
    model = build_model(cfg, config)
    try:
        fill_model(model, plan.maps, element_reader(plan), plan.family.architecture)
    except ConversionError as err:
        raise ConfigError(f"{_KEY}: {err}", key=_KEY) from None
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _dense_plan(hf_dir: str | Path) -> ImportPlan:
    try:
        plan = plan_import(hf_dir, None, {})
    except ConversionError as err:
        raise ConfigError(f"{_KEY}: {err}", key=_KEY) from None
    if plan.cfg.moe.enabled:
        raise ConfigError(f"{_KEY}: {hf_dir} holds a MoE model ({plan.family.architecture}); "
                          "upcycling starts from a dense one", key=_KEY)
    return plan
