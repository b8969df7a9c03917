"""One training step: micro-batches through megatron's forward-backward schedule, then the
optimizer. Returns a metrics dict with the keys of interfaces.md."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.profiler import record_function

from moe_lab.model.lm_loss import fused_lm_loss
from moe_lab.routers.telemetry import BalanceLosses, MoETelemetry
from moe_lab.train import optim
from moe_lab.train.grad_accumulation import zero_grad_buffer
from moe_lab.train.guard import act_on_nonfinite, check_before_update, first_nonfinite
from moe_lab.train.readout import Readout


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
        balance = BalanceLosses(cfg.moe.balance, cfg.model.num_layers, self.moe_pattern)
        self.balance = balance if cfg.moe.enabled and balance.coefficients else None
        self._ahead: tuple[int, list[dict]] | None = None  # (step, outputs) queued early

    @property
    def expert_load(self):
        """[MoE layers, experts] int64 tokens per expert of the last step; None when dense."""
        return self.moe_telemetry.expert_load if self.moe_telemetry else None

    def step(self, step: int, batches: list[dict],
             next_batches: list[dict] | None = None) -> dict[str, float]:
        """Train on this rank's micro-batches of global step `step` (0-based).

        With `next_batches` (step + 1's micro-batches) and the fused update, step + 1's forward
        and backward are queued behind this step's update before this step's numbers are read:
        the GPU then has a whole step of work queued while the host reads, logs and checks, and
        does not wait for the host's next forward. They read only what this step's update and
        expert-bias update wrote (both queued before them, and skipped on the GPU together).
        The next call, for step + 1, uses them; its `batches` must be those `next_batches`."""
        outputs = self._take_ahead(step)
        if outputs is None:
            outputs = self._forward_backward(batches)
        norm, numbers, readout = self._queue_update(outputs, len(batches))
        if next_batches is not None and norm is not None:
            self._ahead = step + 1, self._forward_backward(next_batches)
        return self._finish(step, norm, numbers, readout)

    def _take_ahead(self, step: int) -> list[dict] | None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] != step:
            # its routing counts and balancing losses would leak into this step's
            raise RuntimeError(f"Trainer.step({step}) after step {ahead[0]}'s forward and "
                               f"backward were queued")
        return None if ahead is None else ahead[1]

    def _forward_backward(self, batches: list[dict]) -> list[dict]:
        t = self.cfg.training
        # phase:* ranges name the step's parts in a profile (moe-lab bench --profile).
        with record_function("phase:zero_grad"):
            zero_grad_buffer(self.model)  # megatron's, minus the zeros the hooks overwrite
            self.optimizer.zero_grad()
        with record_function("phase:forward_backward"):
            return self.forward_backward(
                forward_step_func=self.forward_step,
                data_iterator=iter(batches),
                model=[self.model],
                num_microbatches=len(batches),
                seq_length=t.seq_length,
                micro_batch_size=t.micro_batch_size,
                forward_only=False,
            )

    def _queue_update(self, outputs: list[dict], num_microbatches: int):
        """The step's numbers into one host copy, then (fused path) the update and the expert
        biases' update, all queued before anything is read; both skip themselves on the GPU
        when the loss or the norm is not finite. Returns (norm or None, numbers, readout)."""
        with record_function("phase:guard"):
            # the global gradient norm, once (fused path; None: megatron's step computes it)
            norm = optim.prepare_and_norm(self.optimizer,
                                          getattr(self.model, "moe_lab_hook_squares", None))
            numbers = self._queue_numbers(outputs, num_microbatches, norm)
            readout = Readout(numbers)
        if norm is not None:
            with record_function("phase:optimizer"):
                optim.fused_update(self.optimizer, norm, self.cfg.optimizer.clip_grad,
                                   numbers["nonfinite"])
                if self.moe_telemetry:
                    self.moe_telemetry.update_expert_biases(keep=1.0 - numbers["nonfinite"])
        return norm, numbers, readout

    def _finish(self, step: int, norm, numbers, readout) -> dict[str, float]:
        """Reads the step's numbers and acts on them: metrics, the non-finite guard, and on
        megatron's path (norm None) the expert biases and megatron's own optimizer step."""
        with record_function("phase:guard"):
            values = readout.get()
            metrics = self._metrics(values)
            if norm is None:
                skipped = check_before_update(self.cfg, step, metrics, self.optimizer)
            else:
                grad_norm = float(values["grad_norm"])
                bad = first_nonfinite(metrics["loss"], grad_norm)
                if bad is not None:
                    optim.undo_skipped_update(self.optimizer)
                skipped = act_on_nonfinite(self.cfg, step, metrics, self.optimizer, bad)
        if skipped is not None:  # a NaN/Inf with training.on_nonfinite=skip
            return skipped
        if norm is None:
            if self.moe_telemetry:
                self.moe_telemetry.update_expert_biases()
            with record_function("phase:optimizer"):
                _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        # The host waited for this step's numbers only: the GPU is still running the update
        # (and the next step's forward and backward when they were queued).
        return metrics

    def _queue_numbers(self, outputs: list[dict], num_microbatches: int,
                       norm: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The step's numbers on the device, reduced over ranks, without reading them: the LM
        loss, the balancing losses, `loss` (their sum), the routing rows and, on the fused
        path, the gradient norm and `nonfinite` (1.0: the update must not happen)."""
        lm = self._lm_loss(outputs)
        numbers = {"loss/lm": lm}
        loss = lm
        if self.balance is not None:
            balance = self.balance.queue(num_microbatches)
            numbers.update({f"balance:{name}": v for name, v in balance.items()})
            loss = lm + self.balance.weighted_sum(balance)
        numbers["loss"] = loss
        if self.moe_telemetry:
            numbers["routing"] = self.moe_telemetry.queue_rows()
        if norm is not None:
            numbers["grad_norm"] = norm.reshape(())
            finite = torch.isfinite(loss) & torch.isfinite(numbers["grad_norm"])
            numbers["nonfinite"] = (~finite).to(torch.float32)
        return numbers

    def _lm_loss(self, outputs: list[dict]) -> torch.Tensor:
        """Token-weighted mean over micro-batches and DP ranks, on every rank (0-d float64)."""
        device = next(self.model.parameters()).device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for out in outputs:  # empty on pipeline stages without the loss
            total += out["lm"].detach().double()
        if self.cfg.parallel.pp > 1 or self.dp_size > 1:
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(
                with_context_parallel=True))
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total[0] / total[1]

    def _metrics(self, values: dict) -> dict[str, float]:
        metrics = {"loss/lm": float(values["loss/lm"])}
        if self.balance is not None:
            metrics.update(self.balance.metrics(
                {name: values[f"balance:{name}"] for name in self.balance.coefficients}))
        metrics["loss"] = float(values["loss"])
        if self.moe_telemetry:
            metrics.update(self.moe_telemetry.finish(values["routing"]))
        return metrics
