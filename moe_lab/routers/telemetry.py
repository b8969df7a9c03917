"""MoE telemetry: per MoE layer, what the routers did over one step's global batch.

`MoETelemetry(model, moe_pattern, num_experts, topk)` finds the model's MoE layers; every
router's forward in training adds to its `RoutingStats` (moe-lab routers do it themselves; for
any other router class a forward hook counts its routing map). `queue_rows()`, called once
per step on every rank after the backward pass, stacks one row per MoE layer and sums the rows
over all ranks with ONE all-reduce on the device (each layer lives on one pipeline stage, and
that stage's data-, expert-, tensor- (sequence-) and context-parallel ranks each route different
tokens, so the sum is the global batch); `finish(rows)` turns the host copy into the metrics, and
`update_expert_biases(keep)` applies the aux-loss-free bias updates from those counts, on the
device, unless the step's update is skipped:

  moe/layer_NN/load_max_over_mean  busiest expert's tokens / mean tokens per expert (1 = even)
  moe/layer_NN/load_cv             std / mean of tokens per expert (0 = even)
  moe/layer_NN/entropy             mean over tokens of the entropy (nats) of the router's
                                   distribution over experts (ln E = uniform)
  moe/layer_NN/dead_experts        experts that received no token
  moe/layer_NN/dropped_frac        routing slots not served (capacity), or for expert choice
                                   the fraction of tokens no expert took
  moe/telemetry_s                  host time spent on telemetry this step

NN is the layer's 0-based index in the whole model (HF numbering: model.layers.NN). The
[MoE layers, experts] token counts stay available as `expert_load` (numpy int64).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from moe_lab.routers.stats import EXTRA, RoutingStats


@dataclass(frozen=True)
class RoutingLoad:
    """One step's routing over the global batch, per MoE layer (rows in layer order)."""

    layers: list[int]  # 0-based model layer index of each row
    tokens: np.ndarray  # [MoE layers, experts] int64 tokens routed to each expert
    entropy: np.ndarray  # [MoE layers] mean per-token entropy, nats
    dropped_frac: np.ndarray  # [MoE layers]

    def metrics(self) -> dict[str, float]:
        counts = self.tokens.astype(np.float64)
        mean = counts.mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            max_over_mean = counts.max(axis=1) / mean
            cv = counts.std(axis=1) / mean
        out: dict[str, float] = {}
        for row, layer in enumerate(self.layers):
            key = f"moe/layer_{layer:02d}"
            out[f"{key}/load_max_over_mean"] = float(max_over_mean[row])
            out[f"{key}/load_cv"] = float(cv[row])
            out[f"{key}/entropy"] = float(self.entropy[row])
            out[f"{key}/dead_experts"] = int((self.tokens[row] == 0).sum())
            out[f"{key}/dropped_frac"] = float(self.dropped_frac[row])
        return out


def reduce_rows(rows: torch.Tensor) -> torch.Tensor:
    """Sum [MoE layers, experts + extras] over every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(rows)
    return rows


def load_from_rows(layers: list[int], rows: np.ndarray, num_experts: int) -> RoutingLoad:
    extra = {name: rows[:, num_experts + i] for i, name in enumerate(EXTRA)}
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = extra["entropy_sum"] / extra["entropy_tokens"]
        dropped = extra["dropped"] / extra["slots"]
    return RoutingLoad(layers, np.rint(rows[:, :num_experts]).astype(np.int64), entropy, dropped)


class MoETelemetry:
    def __init__(self, model: torch.nn.Module, moe_pattern: list[int], num_experts: int,
                 topk: int):
        self.layers = [i for i, is_moe in enumerate(moe_pattern) if is_moe]
        self.num_experts, self.topk = num_experts, topk
        self.routers: dict[int, torch.nn.Module] = {}  # this rank's, by 0-based layer index
        for module in model.modules():
            if isinstance(module, MoELayer) and not module.is_mtp_layer:
                self.routers[module.layer_number - 1] = self._with_stats(module.router)
        self.device = next(model.parameters()).device
        self.last: RoutingLoad | None = None
        self.rows: torch.Tensor | None = None  # the last queue_rows(), on the device
        self._seconds = 0.0

    @property
    def expert_load(self) -> np.ndarray | None:
        """[MoE layers, experts] int64 tokens per expert of the last step, or None before it."""
        return None if self.last is None else self.last.tokens

    def _with_stats(self, router: torch.nn.Module) -> torch.nn.Module:
        if not isinstance(getattr(router, "routing_stats", None), RoutingStats):
            router.routing_stats = RoutingStats(self.num_experts)
            router.register_forward_hook(self._count_foreign)
        return router

    def _count_foreign(self, router, args, output) -> None:
        """Counts for a router class that does not record itself: no scores, so no entropy."""
        if router.training and torch.is_grad_enabled():
            _, routing_map = output
            slots = routing_map.shape[0] * self.topk
            dropped = torch.clamp(slots - routing_map.sum(), min=0)
            router.routing_stats.record(routing_map.bool(), slots, dropped)

    def queue_rows(self) -> torch.Tensor:
        """This step's rows, summed over all ranks on the device: no read back to the host, so
        the trainer can queue the optimizer's update before it reads them (`finish`)."""
        start = time.perf_counter()
        width = self.num_experts + len(EXTRA)
        rows = torch.zeros(len(self.layers), width, dtype=torch.float64, device=self.device)
        for row, layer in enumerate(self.layers):
            if layer in self.routers:
                rows[row], seconds = self.routers[layer].routing_stats.take(self.device)
                self._seconds += seconds
        self.rows = reduce_rows(rows)
        self._seconds += time.perf_counter() - start
        return self.rows

    def finish(self, rows: np.ndarray) -> dict[str, float]:
        """The metrics of the rows `queue_rows` returned, read back to the host."""
        start = time.perf_counter()
        self.last = load_from_rows(self.layers, rows, self.num_experts)
        metrics = self.last.metrics()
        metrics["moe/telemetry_s"] = self._seconds + time.perf_counter() - start
        self._seconds = 0.0
        return metrics

    def update_expert_biases(self, keep: torch.Tensor | None = None) -> None:
        """The aux-loss-free bias updates from the counts of the last queue_rows(), still on the
        device: a copy from the host would wait for the update queued before it. `keep`: a 0-d
        device tensor, 0.0 when the step's update is skipped (the biases then stay too)."""
        for row, layer in enumerate(self.layers):
            router = self.routers.get(layer)
            if router is not None and getattr(router, "uses_expert_bias", False):
                router.update_expert_bias(self.rows[row, : self.num_experts], keep)


class BalanceLosses:
    """The balancing losses of one step from megatron's MoE metrics tracker, per MoE layer.

    `queue(num_microbatches)` reduces the tracker's per-layer values over ranks on the device
    (megatron's own reduction), takes them out (the tracker starts the next step from zero) and
    returns them as device tensors; `weighted_sum` is their coefficient-weighted sum over layers
    (it joins `loss`), and `metrics` names the host copies: `moe/layer_NN/loss/<term>`,
    `loss/aux` (the aux terms' layer means, summed; 1.0 is balanced) and `loss/z`.
    """

    TERMS = {"load_balancing_loss": "aux", "seq_load_balancing_loss": "seq_aux",
             "global_load_balancing_loss": "global_aux", "z_loss": "z"}

    def __init__(self, balance, num_layers: int, moe_pattern: list[int]):
        self.coefficients = {name: getattr(balance, term) for name, term in self.TERMS.items()
                             if getattr(balance, term) > 0}
        self.num_layers, self.moe_pattern = num_layers, moe_pattern

    def queue(self, num_microbatches: int) -> dict[str, torch.Tensor]:
        tracker = get_moe_metrics_tracker()
        for name in self.coefficients:  # ranks without MoE layers join the reduction too
            tracker.ensure_initialized(name, self.num_layers)
        # tracker.report() would read every value back to the host (a synchronisation); its
        # reduction alone is what megatron's deprecated reduce_aux_losses_tracker_across_ranks
        # names as its replacement.
        tracker._sync_metrics(list(self.coefficients))
        values = {name: tracker.metrics[name].values.float() * (1.0 / num_microbatches)
                  for name in self.coefficients}
        tracker.clear()
        return values

    def weighted_sum(self, values: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return sum((coeff * values[name].sum() for name, coeff in self.coefficients.items()), 0.0)

    def metrics(self, values: dict[str, np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = {}
        layers = [i for i, is_moe in enumerate(self.moe_pattern) if is_moe]
        aux = None
        for name, per_layer in values.items():
            term = self.TERMS[name]
            out.update({f"moe/layer_{i:02d}/loss/{term}": float(per_layer[i]) for i in layers})
            mean = float(per_layer.sum()) / len(layers)
            if term == "z":
                out["loss/z"] = mean
            else:
                aux = mean if aux is None else aux + mean
        if aux is not None:
            out["loss/aux"] = aux
        return out
