"""`expert_choice`: experts choose tokens (Zhou et al. 2022, arXiv 2202.09368).

Each expert takes the `capacity = ceil(tokens * topk * capacity_factor / experts)` tokens with
the highest softmax affinity to it (at most all tokens), so every expert is filled exactly to
capacity and the load is balanced by construction; a token may get any number of experts,
including none (reported as dropped). Gradients reach the router weights through the affinities
that weight the chosen experts' outputs.

NOT CAUSAL. Whether token t is taken by an expert depends on the affinities of every other token
the router sees at once: the whole micro-batch on this rank (its sequence shard under sequence
parallelism), later positions of t's own sequence included. In training this lets future tokens
influence how token t is processed, and in autoregressive decoding the choice cannot be made the
same way, so losses are not comparable one-to-one with causal routers; the paper evaluates on
fine-tuning tasks for the same reason.

Differences from the paper: the choice runs over the tokens of one router call (micro-batch x
sequence shard), not a global batch; no regularised linear programme caps the experts per token.

Parameters: `capacity_factor` (default 1.0; `moe.capacity_factor` must stay null). Balancing
losses do not apply (z-loss does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_lab.routers.base import LabRouter, Selection
from moe_lab.routers.registry import register_router_class


@dataclass(frozen=True)
class ExpertChoiceParams:
    capacity_factor: float = 1.0

    def __post_init__(self):
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")


class ExpertChoiceRouter(LabRouter):
    Params = ExpertChoiceParams
    BALANCE_TERMS = ("z",)
    TOKEN_CHOICE = False

    @classmethod
    def transformer_config_fields(cls, params) -> dict:
        # Any capacity factor makes megatron's alltoall dispatcher size its buffers from the
        # routing map instead of assuming topk experts per token; megatron's own token dropping
        # is not applied to expert choice (LabRouter drops only for token choice).
        return {**super().transformer_config_fields(params),
                "moe_expert_capacity_factor": params.capacity_factor}

    @classmethod
    def check_config(cls, params, cfg) -> None:
        if cfg.moe.capacity_factor is not None:
            raise ValueError("moe.capacity_factor: expert_choice sets its own capacity with "
                             "moe.router.capacity_factor; leave moe.capacity_factor null")

    def capacity(self, num_tokens: int) -> int:
        per_expert = num_tokens * self.topk * self.router_params.capacity_factor / self.num_experts
        return max(1, min(num_tokens, math.ceil(per_expert)))

    def select(self, logits: torch.Tensor) -> Selection:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        chosen_tokens = torch.topk(scores, k=self.capacity(scores.shape[0]), dim=0).indices
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(0, chosen_tokens, True)
        probs = (scores * routing_map).type_as(logits)
        return Selection(probs, routing_map, scores)


register_router_class("expert_choice", ExpertChoiceRouter)
