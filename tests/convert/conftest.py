"""Fixtures for conversion tests: a world of one (gloo, CPU compat layer) in this process, and
helpers that import/export through the same functions the CLI calls."""

from __future__ import annotations

import pytest
import torch

from moe_lab import config as C
from moe_lab.convert import plan_export, plan_import, write_export, write_import
from moe_lab.launch.distributed import detect_env, init_distributed, shutdown_distributed


@pytest.fixture(scope="module")
def world():
    from moe_lab.compat import enable_cpu_compat

    enable_cpu_compat()
    init_distributed(C.ExperimentConfig(), detect_env({}), use_gpu=False)
    yield
    shutdown_distributed()


def import_hf(hf_dir, out, layout=None):
    plan = plan_import(hf_dir, out, layout or {})
    write_import(plan, use_gpu=False)
    return plan


def export_hf(ckpt, out, max_shard_bytes=10**9, **kwargs):
    plan = plan_export(ckpt, out, **kwargs)
    write_export(plan, max_shard_bytes)
    return plan


def mcore_logits(cfg, ckpt_dir, tokens):
    """moe-lab's forward (megatron GPTModel) with the weights of a converted checkpoint."""
    from moe_lab.model import build_model, build_transformer_config
    from moe_lab.train.checkpoint import latest_checkpoint, load_checkpoint

    model = build_model(cfg, build_transformer_config(cfg, use_cpu_initialization=True))
    load_checkpoint(latest_checkpoint(ckpt_dir) or ckpt_dir, model)
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)
