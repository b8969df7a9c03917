"""A user router loaded by dotted path (`tests.routers.crafted:CraftedRouter`), whose routing is
fixed by each token's position in the router call, so the telemetry can be checked by hand.

Token i of a call (of T tokens, T a multiple of 4) goes to experts i % 4 and 4 + i % 2, with
weight 1/2 each: per call experts 0-3 get T/4 tokens, experts 4 and 5 get T/2, experts 6 and 7
none. Its scores are uniform over the 8 experts for even i (entropy ln 8) and 1/2, 1/2 on two
experts for odd i (entropy ln 2).
"""

from dataclasses import dataclass

import torch

from moe_lab.routers.base import LabRouter, Selection, scatter_topk


@dataclass(frozen=True)
class CraftedParams:
    weight: float = 0.5


class CraftedRouter(LabRouter):
    Params = CraftedParams
    BALANCE_TERMS = ()

    def select(self, logits: torch.Tensor) -> Selection:
        tokens, experts = logits.shape
        i = torch.arange(tokens, device=logits.device)
        indices = torch.stack([i % 4, 4 + i % 2], dim=-1)
        weights = torch.full(indices.shape, self.router_params.weight, device=logits.device)
        probs, routing_map = scatter_topk(weights, indices, experts)
        scores = torch.zeros(tokens, experts, device=logits.device)
        scores[0::2] = 1.0 / experts
        scores[1::2, :2] = 0.5
        return Selection(probs, routing_map, scores)
