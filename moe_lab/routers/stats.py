"""What one router saw during a training step: tokens per expert, dropped slots, score entropy.

A `RoutingStats` lives on each router and accumulates, on the router's device and without any
host synchronisation, over the micro-batches of a step. `moe_lab.routers.telemetry` collects the
rows of all layers once per step and reduces them over the global batch.
"""

from __future__ import annotations

import time

import torch

# Layout of one row: tokens per expert, then these sums.
EXTRA = ("entropy_sum", "entropy_tokens", "slots", "dropped")


class RoutingStats:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.seconds = 0.0  # host time spent recording since the last take()
        self._row: torch.Tensor | None = None

    def record(self, routing_map: torch.Tensor, slots, dropped, scores: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> None:
        """Add one forward pass.

        routing_map: [tokens, experts] bool after capacity. slots: routing slots the tokens asked
        for (tokens * topk for token choice); dropped: how many of them were not served (both
        ints or 0-d tensors). scores: [tokens, experts] the router's distribution over experts,
        whose entropy is reported (rows are normalised here). valid: [tokens] bool, False for
        padding.
        """
        start = time.perf_counter()
        with torch.no_grad():
            if valid is not None:
                routing_map = routing_map & valid.unsqueeze(-1)
            if self._row is None:
                self._row = torch.zeros(self.num_experts + len(EXTRA), dtype=torch.float64,
                                        device=routing_map.device)
            row = self._row
            row[: self.num_experts] += routing_map.sum(dim=0)
            if scores is not None:
                p = scores.detach().float()
                p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20)
                entropy = torch.special.entr(p).sum(dim=-1)
                if valid is not None:
                    entropy = entropy[valid]
                row[self.num_experts] += entropy.sum()
                row[self.num_experts + 1] += entropy.numel()
            row[self.num_experts + 2] += slots
            row[self.num_experts + 3] += dropped
        self.seconds += time.perf_counter() - start

    def take(self, device) -> tuple[torch.Tensor, float]:
        """This step's row (zeros if nothing was recorded) and the recording time; resets both."""
        row = self._row if self._row is not None else torch.zeros(
            self.num_experts + len(EXTRA), dtype=torch.float64, device=device)
        seconds, self._row, self.seconds = self.seconds, None, 0.0
        return row.to(device), seconds
