"""`topk_sigmoid`: an independent sigmoid score per expert, the top k, weights renormalised to
sum to 1 (DeepSeek-V3, arXiv 2412.19437).

Parameters: `expert_bias`, `bias_update_rate` (aux-loss-free balancing, arXiv 2408.15664, the
way DeepSeek-V3 trains; see `token_choice`). DeepSeek-V3's routed scaling factor (a constant
multiplier on the weights) is not offered. megatron's aux losses score sigmoid routers with
the sigmoid scores normalised over all experts.
"""

from __future__ import annotations

import torch

from moe_lab.routers.registry import register_router_class
from moe_lab.routers.token_choice import TokenChoiceRouter, renormalise


class TopKSigmoidRouter(TokenChoiceRouter):
    @classmethod
    def transformer_config_fields(cls, params) -> dict:
        return {"moe_router_score_function": "sigmoid", "moe_router_pre_softmax": True}

    def scores(self, logits):
        return torch.sigmoid(logits.float())

    def weights(self, logits, scores, indices):
        chosen = scores.gather(1, indices)
        return renormalise(chosen) if self.topk > 1 else chosen


register_router_class("topk_sigmoid", TopKSigmoidRouter)
