"""`sinkhorn`: balanced assignment by Sinkhorn normalisation, S-BASE (Clark et al. 2022,
"Unified Scaling Laws for Routed Language Models", arXiv 2202.01169).

In training, the exponentiated logits of the tokens the router sees are alternately normalised
over tokens and over experts (megatron-core's `sinkhorn`, until the change falls below `tol`),
which approximates the balanced transport plan; each token takes its top k experts of that plan.
The weights are the router's plain scores at those experts (sigmoid for k = 1 as in S-BASE,
softmax for k > 1), so gradients reach the router weights through them and not through the
normalisation. In evaluation the plain top k of the scores is used, as in the paper.

Differences from the paper: S-BASE solves the assignment on the whole batch with one Sinkhorn
problem per step; here it is per router call (micro-batch x sequence shard). Balancing losses do
not apply (z-loss does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.moe_utils import sinkhorn

from moe_lab.routers.base import LabRouter, Selection, scatter_topk
from moe_lab.routers.registry import register_router_class


@dataclass(frozen=True)
class SinkhornParams:
    tol: float = 1e-4

    def __post_init__(self):
        if self.tol <= 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")


class SinkhornRouter(LabRouter):
    Params = SinkhornParams
    BALANCE_TERMS = ("z",)

    def select(self, logits: torch.Tensor) -> Selection:
        if self.topk == 1:
            gate = torch.sigmoid(logits.float())
        else:
            gate = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if self.training:
            with torch.no_grad():
                plan = sinkhorn(logits.float(), tol=self.router_params.tol)
            indices = torch.topk(plan, k=self.topk, dim=-1).indices
        else:
            indices = torch.topk(gate.detach(), k=self.topk, dim=-1).indices
        probs, routing_map = scatter_topk(gate.gather(1, indices), indices, self.num_experts)
        return Selection(probs.type_as(logits), routing_map,
                         torch.softmax(logits.detach(), dim=-1, dtype=torch.float32))


register_router_class("sinkhorn", SinkhornRouter)
