"""`group_limited`: device/node-limited top-k (DeepSeek-V2, arXiv 2405.04434; node-limited in
DeepSeek-V3, arXiv 2412.19437).

The experts are split into `num_groups` equal groups (one per device, or per node, of the
expert-parallel layout). Each token first picks `group_topk` groups, by the sum of its top
(topk / group_topk) scores in each group, then its k experts among those groups only, which
bounds how many devices (nodes) one token's dispatch reaches. Selection is megatron-core's
`group_limited_topk`. DeepSeek-V2 ranks groups by their single best score (M = 3 devices of
top-6); megatron's sum of the top topk/group_topk scores equals that when topk == group_topk.

Parameters: `num_groups`, `group_topk`, `score` (softmax | sigmoid), `norm_topk_prob`
(sigmoid weights are always renormalised, as in topk_sigmoid), `expert_bias`,
`bias_update_rate` (aux-loss-free balancing; the bias shifts the group choice too, as in
DeepSeek-V3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.moe_utils import group_limited_topk

from moe_lab.routers.registry import register_router_class
from moe_lab.routers.token_choice import TokenChoiceParams, TokenChoiceRouter, renormalise

SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class GroupLimitedParams(TokenChoiceParams):
    num_groups: int = 4
    group_topk: int = 1
    score: str = "softmax"
    norm_topk_prob: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if not 0 < self.group_topk <= self.num_groups:
            raise ValueError(f"group_topk must be in [1, num_groups={self.num_groups}], "
                             f"got {self.group_topk}")


class GroupLimitedRouter(TokenChoiceRouter):
    Params = GroupLimitedParams

    @classmethod
    def transformer_config_fields(cls, params) -> dict:
        return {"moe_router_score_function": params.score, "moe_router_pre_softmax": True}

    @classmethod
    def check_config(cls, params, cfg) -> None:
        experts, k = cfg.moe.num_experts, cfg.moe.topk
        if experts % params.num_groups:
            raise ValueError(f"moe.router.num_groups: {params.num_groups} does not divide "
                             f"moe.num_experts {experts}")
        if k < params.group_topk or k > params.group_topk * (experts // params.num_groups):
            raise ValueError(f"moe.router.group_topk: {params.group_topk} groups of "
                             f"{experts // params.num_groups} experts cannot hold exactly "
                             f"moe.topk={k} experts with at least one per chosen group")

    def scores(self, logits):
        if self.router_params.score == "sigmoid":
            return torch.sigmoid(logits.float())
        return torch.softmax(logits, dim=-1, dtype=torch.float32)

    def top_indices(self, ranking):
        p = self.router_params
        _, indices = group_limited_topk(ranking, self.topk, ranking.shape[0], self.num_experts,
                                        p.num_groups, p.group_topk)
        return indices

    def weights(self, logits, scores, indices):
        chosen = scores.gather(1, indices)
        sigmoid = self.router_params.score == "sigmoid"
        if (sigmoid and self.topk > 1) or self.router_params.norm_topk_prob:
            return renormalise(chosen)
        return chosen


register_router_class("group_limited", GroupLimitedRouter)
