"""`hash`: fixed routing by token id, Hash Layers (Roller et al. 2021, arXiv 2106.04426).

Token id v goes to expert `h(v) mod E`, where h is a fixed multiplicative hash salted with
`seed` (the paper's "random hash": a fixed random map from the vocabulary, which needs no
training and no balancing). For topk > 1 the token also takes the experts `h(v) + j * (E // k)`,
j < k (all distinct), each weighted 1/k; the paper's main runs use k = 1 (weight 1). Routing
ignores the hidden states entirely, so it is deterministic across steps, ranks and layouts; the
gate weight is frozen and not computed, and balancing losses do not apply.

The token ids come through `moe_lab.routers.token_ids`, the side channel from the model's input
that is split like the hidden states under sequence parallelism and published on every pipeline
stage (see there). Activation recompute and context parallelism are refused.

Differences from the paper: the hash is a salted integer hash, not a stored random table nor the
paper's frequency-balanced or clustered hashes; every MoE layer uses the same hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab.routers import token_ids
from moe_lab.routers.base import FixedRouter, Selection
from moe_lab.routers.registry import register_router_class

_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant
_PRIME = 4294967311  # the first prime above 2**32


@dataclass(frozen=True)
class HashParams:
    seed: int = 0


def hash_experts(ids: torch.Tensor, num_experts: int, topk: int, seed: int = 0) -> torch.Tensor:
    """[tokens] int ids -> [tokens, topk] distinct experts, a fixed function of (id, seed)."""
    base = ((ids.long() * _MULTIPLIER + seed * 97 + 1) % _PRIME) % num_experts
    stride = num_experts // topk
    offsets = torch.arange(topk, device=ids.device) * stride
    return (base.unsqueeze(-1) + offsets) % num_experts


class HashRouter(FixedRouter):
    Params = HashParams
    NEEDS_TOKEN_IDS = True

    @classmethod
    def check_config(cls, params, cfg) -> None:
        if cfg.training.recompute != "none":
            raise ValueError("training.recompute: the hash router reads token ids published per "
                             "micro-batch, which a recomputed layer would not see; use none")
        if cfg.parallel.cp > 1:
            raise ValueError("parallel.cp: the hash router's token-id channel does not follow "
                             "context-parallel sequence splits; use cp=1")

    def select(self, logits: torch.Tensor) -> Selection:
        ids = token_ids.current(logits.shape[0]).to(logits.device)
        experts = hash_experts(ids, self.num_experts, self.topk, self.router_params.seed)
        return self.fixed_selection(experts, logits)


register_router_class("hash", HashRouter)
