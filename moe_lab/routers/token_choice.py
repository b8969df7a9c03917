"""Learned token-choice top-k routing, with optional aux-loss-free balancing by an expert bias.

`TokenChoiceRouter` is the common part of topk_softmax, topk_sigmoid and group_limited: score
every expert, pick k per token, weight them. With `expert_bias: true` it adds DeepSeek's
aux-loss-free balancing (Wang et al. 2024, arXiv 2408.15664) to any score function, softmax
included (megatron-core only allows it with sigmoid):

- a per-expert bias, a buffer (not a parameter, so no optimizer touches it; saved in
  checkpoints), is added to the scores only to rank experts; the weights that multiply the
  experts' outputs come from the unbiased scores, so no gradient passes through the bias and
  the router weights' gradients do not depend on it beyond which experts were chosen;
- after each step, `update_expert_bias(tokens_per_expert)` moves every bias by
  `bias_update_rate * sign(mean load - expert load)`. The load is the step's global batch:
  `moe_lab.routers.telemetry` reduces the counts over all data- and expert-parallel ranks once
  per step, so every rank that holds a copy of this router applies the same update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab.routers.base import LabRouter, Selection, scatter_topk


@dataclass(frozen=True)
class TokenChoiceParams:
    expert_bias: bool = False
    bias_update_rate: float = 1e-3

    def __post_init__(self):
        if self.bias_update_rate <= 0:
            raise ValueError(f"bias_update_rate must be > 0, got {self.bias_update_rate}")


class TokenChoiceRouter(LabRouter):
    Params = TokenChoiceParams

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, params=None):
        super().__init__(config, pg_collection, is_mtp_layer, params)
        if self.router_params.expert_bias:
            # megatron's TopKRouter sets expert_bias = None when its own (sigmoid-only) bias is
            # off; ours takes the same name, so checkpoints look like megatron's.
            del self.expert_bias
            self.register_buffer("expert_bias", torch.zeros(
                self.num_experts, dtype=torch.float32, device=self.weight.device))

    @property
    def uses_expert_bias(self) -> bool:
        return self.router_params.expert_bias

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[tokens, experts] scores that rank the experts."""
        raise NotImplementedError

    def weights(self, logits, scores, indices) -> torch.Tensor:
        """[tokens, k] weights of the chosen experts, from the unbiased scores."""
        raise NotImplementedError

    def top_indices(self, ranking: torch.Tensor) -> torch.Tensor:
        return torch.topk(ranking, k=self.topk, dim=-1).indices

    def select(self, logits: torch.Tensor) -> Selection:
        scores = self.scores(logits)
        ranking = scores.detach()
        if self.uses_expert_bias:
            ranking = ranking + self.expert_bias
        indices = self.top_indices(ranking)
        probs, routing_map = scatter_topk(self.weights(logits, scores, indices), indices,
                                          self.num_experts)
        return Selection(probs.type_as(logits), routing_map, scores)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor,
                           keep: torch.Tensor | None = None) -> None:
        """One aux-loss-free step from the global batch's tokens per expert; `keep` (0-d, 1.0
        or 0.0) lets the device decide whether it happens, without the host reading it."""
        load = tokens_per_expert.to(self.expert_bias.device, torch.float32)
        change = self.router_params.bias_update_rate * torch.sign(load.mean() - load)
        if keep is not None:
            change = change * keep.to(change.device, torch.float32)
        self.expert_bias += change


def renormalise(weights: torch.Tensor) -> torch.Tensor:
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
