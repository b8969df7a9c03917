"""One training step: micro-batches through megatron's forward-backward schedule, then the
optimizer. Returns a metrics dict with the keys of interfaces.md."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker
from torch.profiler import record_function

from moe_lab.model.lm_loss import fused_lm_loss
from moe_lab.routers.telemetry import LayerLosses, MoETelemetry
from moe_lab.train import optim
from moe_lab.train.guard import check_before_update

# megatron's tracker name -> moe.balance coefficient name
_BALANCE_TERMS = {"load_balancing_loss": "aux", "seq_load_balancing_loss": "seq_aux",
                  "global_load_balancing_loss": "global_aux", "z_loss": "z"}


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of token losses and token count; megatron divides by the count across micro-batches."""
    total = (per_token_loss.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    return total, count, {"lm": torch.stack([total.detach(), count.detach().float()])}


def forward_step_func(cfg):
    """megatron's forward_step_func for this config (training and validation)."""
    return partial(_forward_step, fused_lm_loss if cfg.fused_cross_entropy else None)


def _forward_step(output_processor, data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels = (_to_device(batch[key], device) for key in ("tokens", "labels"))
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    loss_mask = torch.ones_like(labels, dtype=torch.float)
    output = model(tokens, positions, None, labels=labels, loss_mask=loss_mask,
                   output_processor=output_processor)
    return output, partial(_loss_func, loss_mask)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor.to(device)
    # A copy from pageable memory waits for all queued GPU work (the last step's optimizer);
    # from pinned memory it is queued like a kernel.
    return tensor.pin_memory().to(device, non_blocking=True)


class Trainer:
    """Holds what a step needs; `step()` trains one global batch."""

    def __init__(self, cfg, config, model, optimizer, scheduler, data):
        self.cfg, self.config = cfg, config
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.forward_backward = get_forward_backward_func()
        self.forward_step = forward_step_func(cfg)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.moe_pattern = cfg.moe.moe_layers(cfg.model.num_layers)
        self.moe_telemetry = (MoETelemetry(model, self.moe_pattern, cfg.moe.num_experts,
                                           cfg.moe.topk) if cfg.moe.enabled else None)

    @property
    def expert_load(self):
        """[MoE layers, experts] int64 tokens per expert of the last step; None when dense."""
        return self.moe_telemetry.expert_load if self.moe_telemetry else None

    def step(self, step: int, batches: list[dict]) -> dict[str, float]:
        """Train on this rank's micro-batches of global step `step` (0-based)."""
        t = self.cfg.training
        # phase:* ranges name the step's parts in a profile (moe-lab bench --profile).
        with record_function("phase:zero_grad"):
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        with record_function("phase:forward_backward"):
            outputs = self.forward_backward(
                forward_step_func=self.forward_step,
                data_iterator=iter(batches),
                model=[self.model],
                num_microbatches=len(batches),
                seq_length=t.seq_length,
                micro_batch_size=t.micro_batch_size,
                forward_only=False,
            )
        with record_function("phase:guard"):
            # the global gradient norm, once (fused path; None: megatron's step computes it),
            # queued before the reads below so that the GPU computes it while the host waits
            norm = optim.prepare_and_norm(self.optimizer)
        metrics = {"loss/lm": self._reduce_lm_loss(outputs)}
        metrics.update(self._balance_losses(len(batches)))
        metrics["loss"] = metrics["loss/lm"] + metrics.pop("_weighted_balance", 0.0)
        if self.moe_telemetry:
            metrics.update(self.moe_telemetry.end_step())
        with record_function("phase:guard"):
            grad_norm = float(norm) if norm is not None else None
            skipped = check_before_update(self.cfg, step, metrics, self.optimizer, grad_norm)
        if skipped is not None:  # a NaN/Inf with training.on_nonfinite=skip
            return skipped
        if self.moe_telemetry:
            self.moe_telemetry.update_expert_biases()
        with record_function("phase:optimizer"):
            if norm is not None:
                optim.fused_update(self.optimizer, norm, self.cfg.optimizer.clip_grad)
            else:
                _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        # Nothing after the update reads the GPU: the host goes on to the next step's forward
        # while the GPU runs the optimizer (train/loop.py does not synchronise either).
        return metrics

    def _reduce_lm_loss(self, outputs: list[dict]) -> float:
        """Token-weighted mean over micro-batches and DP ranks, delivered to every rank."""
        total = torch.zeros(2, dtype=torch.float64)
        for out in outputs:  # empty on pipeline stages without the loss
            total += out["lm"].detach().double().cpu()
        if self.cfg.parallel.pp > 1 or self.dp_size > 1:
            total = total.to(next(self.model.parameters()).device)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(
                with_context_parallel=True))
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
            total = total.cpu()
        return float(total[0] / total[1])

    def _balance_losses(self, num_microbatches: int) -> dict[str, float]:
        """MoE balancing losses from megatron's tracker, averaged over MoE layers (1.0 is
        balanced for the aux losses); their coefficient-weighted sum over layers joins `loss`."""
        if not self.cfg.moe.enabled:
            return {}
        tracker = get_moe_metrics_tracker()
        names = [n for n, coeff in _BALANCE_TERMS.items()
                 if getattr(self.cfg.moe.balance, coeff) > 0]
        if not names:
            return {}
        totals: dict = {}
        per_layer = LayerLosses()
        tracker.report(loss_scale=1.0 / num_microbatches, iteration=0, track_names=names,
                       num_layers=self.cfg.model.num_layers, moe_layer_freq=self.moe_pattern,
                       force_initialize=True, total_loss_dict=totals, writer=per_layer,
                       per_layer_logging=True)
        layers = sum(self.moe_pattern)
        metrics, weighted, aux = per_layer.metrics(self.moe_pattern), 0.0, 0.0
        for name in names:
            value = float(totals.get(name, 0.0))
            weighted += getattr(self.cfg.moe.balance, _BALANCE_TERMS[name]) * value * layers
            if name == "z_loss":
                metrics["loss/z"] = value
            else:
                aux += value
        if any(n != "z_loss" for n in names):
            metrics["loss/aux"] = aux
        metrics["_weighted_balance"] = weighted
        return metrics
