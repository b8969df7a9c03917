"""`LabRouter`: megatron-core's TopKRouter with the expert selection made pluggable.

megatron's `TopKRouter.routing` hard-codes how experts are chosen. `LabRouter` keeps everything
around that choice from megatron, through its own methods: the gating linear (fp32), the router
z-loss, token dropping with `moe.capacity_factor`, the aux / seq-aux / global-aux balancing
losses and their logging in megatron's MoE metrics tracker. A router file implements only
`select(logits)`. Every forward in training also records `RoutingStats` for the telemetry.

Names follow megatron: logits [tokens, experts] from the gate; scores, the router's distribution
over experts; probs, the weights that combine the experts' outputs (0 where not routed);
routing_map, bool [tokens, experts].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
)
from megatron.core.transformer.moe.router import TopKRouter

from moe_lab.routers.stats import RoutingStats


@dataclass(frozen=True)
class NoParams:
    """A router without parameters of its own."""


@dataclass
class Selection:
    probs: torch.Tensor  # [tokens, experts]
    routing_map: torch.Tensor  # [tokens, experts] bool
    scores: torch.Tensor  # [tokens, experts], for the entropy telemetry


class LabRouter(TopKRouter):
    Params: ClassVar[type] = NoParams
    BALANCE_TERMS: ClassVar[tuple[str, ...]] = ("aux", "seq_aux", "global_aux", "z")
    TOKEN_CHOICE: ClassVar[bool] = True  # each token asks for topk experts

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, params=None):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.router_params = params if params is not None else self.Params()
        self.routing_stats = RoutingStats(self.num_experts)

    @classmethod
    def transformer_config_fields(cls, params) -> dict:
        """TransformerConfig fields this router reads. The score function is what megatron's
        aux losses score with; pre-softmax only matters to megatron's own checks."""
        return {"moe_router_score_function": "softmax", "moe_router_pre_softmax": True}

    @classmethod
    def check_config(cls, params, cfg) -> None:
        """Raise ValueError('<dotted key>: ...') when the experiment cannot use this router."""

    def select(self, logits: torch.Tensor) -> Selection:
        raise NotImplementedError

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Megatron's routing steps around `select`: z-loss, select, capacity, balance losses."""
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)  # True = padding
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        chosen = self.select(logits)
        probs, routing_map = chosen.probs, chosen.routing_map
        if self.TOKEN_CHOICE and self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        training = self.training and torch.is_grad_enabled()
        if training and self.is_aux_loss_enabled():
            probs = self._attach_balance_losses(logits, probs, seq_length, bsz, padding_mask)
        if training:  # once per micro-batch: under activation recompute the first pass has no grad
            self._record(chosen, routing_map, padding_mask)
        return probs, routing_map

    def _attach_balance_losses(self, logits, probs, seq_length, bsz, padding_mask):
        """megatron's aux losses, scored on the unbiased top-k of the router's score function."""
        aux_map, aux_scores = compute_routing_scores_for_aux_loss(
            logits, self.topk, self.score_function, padding_mask=padding_mask)
        masked = padding_mask is not None
        probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
        probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, seq_length, bsz,
                                         with_padding_mask=masked)
        return self._apply_global_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)

    def _record(self, chosen: Selection, routing_map, padding_mask) -> None:
        valid = None if padding_mask is None else ~padding_mask
        if self.TOKEN_CHOICE:
            asked = chosen.routing_map if valid is None else chosen.routing_map & valid[:, None]
            slots = asked.sum()
            served = routing_map.sum() if valid is None else (routing_map & valid[:, None]).sum()
            dropped = slots - served
        else:  # experts choose: a token is dropped when no expert took it
            unrouted = ~routing_map.any(dim=-1)
            slots = unrouted.numel() if valid is None else valid.sum()
            dropped = (unrouted if valid is None else unrouted & valid).sum()
        self.routing_stats.record(routing_map, slots, dropped, chosen.scores, valid)


class FixedRouter(LabRouter):
    """A router without a learned gate: its weight is frozen and the gate is not computed."""

    BALANCE_TERMS = ()

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, params=None):
        super().__init__(config, pg_collection, is_mtp_layer, params)
        self.weight.requires_grad_(False)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return input.new_zeros(*input.shape[:-1], self.num_experts, dtype=torch.float32)

    def fixed_selection(self, indices: torch.Tensor, logits: torch.Tensor) -> Selection:
        weights = torch.full(indices.shape, 1.0 / self.topk, device=indices.device)
        probs, routing_map = scatter_topk(weights, indices, self.num_experts)
        return Selection(probs.type_as(logits), routing_map, probs)


def scatter_topk(weights: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """[tokens, k] weights and expert indices -> probs and routing_map, [tokens, experts]."""
    probs = weights.new_zeros(weights.shape[0], num_experts).scatter(1, indices, weights)
    routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, indices, True)
    return probs, routing_map
