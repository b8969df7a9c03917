"""MoE telemetry: per MoE layer, what the routers did over one step's global batch.

`MoETelemetry(model, moe_pattern, num_experts, topk)` finds the model's MoE layers; every
router's forward in training adds to its `RoutingStats` (moe-lab routers do it themselves; for
any other router class a forward hook counts its routing map). `end_step()`, called once per
step on every rank between the backward pass and the update, stacks one row per MoE layer,
sums the rows over all ranks with ONE all-reduce (each layer lives on one pipeline stage, and
that stage's data-, expert-, tensor- (sequence-) and context-parallel ranks each route different
tokens, so the sum is the global batch) and returns the metrics; `update_expert_biases()` then
applies the aux-loss-free bias updates from those counts when the update goes ahead:

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

    def end_step(self) -> dict[str, float]:
        """Reduce this step's routing over all ranks and return its metrics. Reads the counts
        back to the host, so the trainer calls it before the update, where the step waits for
        the GPU anyway: no synchronisation after the update lets the host queue the next
        step's forward while the GPU still runs the optimizer."""
        start = time.perf_counter()
        width = self.num_experts + len(EXTRA)
        rows = torch.zeros(len(self.layers), width, dtype=torch.float64, device=self.device)
        recorded = 0.0
        for row, layer in enumerate(self.layers):
            if layer in self.routers:
                rows[row], seconds = self.routers[layer].routing_stats.take(self.device)
                recorded += seconds
        rows = reduce_rows(rows)
        self.last = load_from_rows(self.layers, rows.cpu().numpy(), self.num_experts)
        metrics = self.last.metrics()
        metrics["moe/telemetry_s"] = recorded + time.perf_counter() - start
        return metrics

    def update_expert_biases(self) -> None:
        """The aux-loss-free bias updates from the counts of the last end_step()."""
        load = self.last
        for row, layer in enumerate(load.layers):
            router = self.routers.get(layer)
            if router is not None and getattr(router, "uses_expert_bias", False):
                router.update_expert_bias(torch.from_numpy(load.tokens[row]))


class LayerLosses:
    """Per-layer balancing-loss values from megatron's MoE metrics tracker.

    Passed as the `writer` of `tracker.report(..., per_layer_logging=True)`, which writes each
    layer's value as `moe/<megatron name>_layer_<0-based layer>`; `metrics()` renames them
    `moe/layer_NN/loss/<moe.balance term>`.
    """

    TERMS = {"load_balancing_loss": "aux", "seq_load_balancing_loss": "seq_aux",
             "global_load_balancing_loss": "global_aux", "z_loss": "z"}

    def __init__(self):
        self.values: dict[tuple[int, str], float] = {}

    def add_scalar(self, name: str, value, iteration=None) -> None:
        megatron_name, _, layer = name.removeprefix("moe/").rpartition("_layer_")
        if name.startswith("moe/") and megatron_name in self.TERMS and layer.isdigit():
            self.values[(int(layer), self.TERMS[megatron_name])] = float(value)

    def metrics(self, moe_pattern: list[int]) -> dict[str, float]:
        return {f"moe/layer_{layer:02d}/loss/{term}": value
                for (layer, term), value in sorted(self.values.items()) if moe_pattern[layer]}
