"""`topk_softmax`: softmax over all experts, then the top k (Shazeer et al. 2017, arXiv
1701.06538; as in Qwen1.5/Qwen2-MoE and Mixtral).

Parameters:
- `norm_topk_prob` (default false): renormalise the k weights to sum to 1. Off, they keep their
  share of the full softmax, as in the released Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B.
- `order`: `softmax_topk` (default) or `topk_softmax`, Mixtral's top-k of the logits followed by
  a softmax over the k chosen logits. That softmax is always normalised, so `norm_topk_prob` has
  no effect there; it equals `softmax_topk` with `norm_topk_prob: true` (same function of the
  logits, same gradients), and is kept so configs can say what a paper does. Needs topk > 1 (a
  softmax over one logit is constant: the router would get no gradient).
- `expert_bias`, `bias_update_rate`: aux-loss-free balancing (see `token_choice`); the bias is
  added to the softmax probabilities when ranking experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab.routers.registry import register_router_class
from moe_lab.routers.token_choice import TokenChoiceParams, TokenChoiceRouter, renormalise

ORDERS = ("softmax_topk", "topk_softmax")


@dataclass(frozen=True)
class TopKSoftmaxParams(TokenChoiceParams):
    norm_topk_prob: bool = False
    order: str = "softmax_topk"

    def __post_init__(self):
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


class TopKSoftmaxRouter(TokenChoiceRouter):
    Params = TopKSoftmaxParams

    @classmethod
    def transformer_config_fields(cls, params) -> dict:
        return {"moe_router_score_function": "softmax",
                "moe_router_pre_softmax": params.order == "softmax_topk"}

    @classmethod
    def check_config(cls, params, cfg) -> None:
        if params.order == "topk_softmax" and cfg.moe.topk == 1:
            raise ValueError("moe.router.order: topk_softmax needs moe.topk > 1 (a softmax over "
                             "one logit gives the router no gradient); use softmax_topk")

    def scores(self, logits):
        return torch.softmax(logits, dim=-1, dtype=torch.float32)

    def weights(self, logits, scores, indices):
        if self.router_params.order == "topk_softmax":
            return torch.softmax(logits.gather(1, indices).float(), dim=-1)
        chosen = scores.gather(1, indices)
        return renormalise(chosen) if self.router_params.norm_topk_prob else chosen


register_router_class("topk_softmax", TopKSoftmaxRouter)
