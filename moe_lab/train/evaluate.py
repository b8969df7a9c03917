"""Validation loss: the model's token-mean cross-entropy on the data source's fixed held-out
set, forward only, through megatron's forward-backward schedule (so pipeline stages work).

Used every training.eval_interval steps by the loop (logged as `valid/loss`, split "valid") and
by `moe-lab eval` on a checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from moe_lab.data import build_data_source
from moe_lab.model import build_model, build_transformer_config
from moe_lab.train.checkpoint import load_checkpoint
from moe_lab.train.step import forward_step_func


def validation_loss(cfg, model, data) -> float:
    """Token-mean loss over the held-out set, the same value on every rank."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = data.valid_batches(dp_rank, dp_size)
    model.eval()
    try:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step_func(cfg), data_iterator=iter(batches), model=[model],
                num_microbatches=len(batches), seq_length=cfg.training.seq_length,
                micro_batch_size=cfg.training.micro_batch_size, forward_only=True)
    finally:
        model.train()
    total = torch.zeros(2, dtype=torch.float64)
    for out in outputs:  # empty on pipeline stages without the loss
        total += out["lm"].double().cpu()
    if dist.get_world_size() > 1:
        device = next(model.parameters()).device
        total = total.to(device)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        total = total.cpu()
    return float(total[0] / total[1])


def validation_due(cfg, step: int) -> bool:
    """Whether the run validates after `step` steps (every training.eval_interval; 0: never)."""
    interval = cfg.training.eval_interval
    return bool(interval) and step % interval == 0


def log_validation(cfg, model, data, step: int, sinks: list) -> float | None:
    """Every training.eval_interval steps: valid/loss to the sinks (split "valid")."""
    if not validation_due(cfg, step):
        return None
    loss = validation_loss(cfg, model, data)
    for sink in sinks:
        sink.log(step, {"valid/loss": loss}, split="valid")
    return loss


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def evaluate_checkpoint(cfg, checkpoint, use_gpu: bool, blends: list, cache_dir) -> list[float]:
    """Validation loss of the checkpoint's weights on each blend's held-out set (None: the
    config's own held-out set)."""
    torch.manual_seed(cfg.training.seed)
    config = build_transformer_config(cfg, use_cpu_initialization=not use_gpu)
    model = build_model(cfg, config)
    if use_gpu:
        model.cuda()
    load_checkpoint(checkpoint, model)
    return [validation_loss(cfg, model, build_data_source(cfg, cache_dir, train=False,
                                                          valid_blend=blend))
            for blend in blends]
