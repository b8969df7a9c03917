"""Token-choice top-k routers, as megatron-core's TopKRouter computes them.

- `topk_softmax`: softmax over all experts, then top-k (Qwen2-MoE, Qwen1.5-MoE, Mixtral;
  Shazeer et al. 2017, arXiv 1701.06538). With `norm_topk_prob` the k weights are renormalised to
  sum to 1, which equals a softmax over the k selected logits (megatron's default order); without
  it they keep their share of the full softmax (megatron's `moe_router_pre_softmax`), as in the
  released Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B.
- `topk_sigmoid`: independent sigmoid scores, top-k, renormalised (DeepSeek-V3, arXiv 2412.19437);
  `expert_bias` adds DeepSeek's aux-loss-free balancing bias (arXiv 2408.15664), which affects
  only which experts are selected and is updated from the observed load after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.moe.router import TopKRouter

from moe_lab.routers.registry import register_router


@dataclass(frozen=True)
class TopKSoftmaxParams:
    norm_topk_prob: bool = False


@dataclass(frozen=True)
class TopKSigmoidParams:
    expert_bias: bool = False
    bias_update_rate: float = 1e-3

    def __post_init__(self):
        if self.bias_update_rate <= 0:
            raise ValueError(f"bias_update_rate must be > 0, got {self.bias_update_rate}")


register_router(
    "topk_softmax",
    TopKSoftmaxParams,
    transformer_config=lambda p: {
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not p.norm_topk_prob,
    },
    builder=lambda p: TopKRouter,
)

register_router(
    "topk_sigmoid",
    TopKSigmoidParams,
    transformer_config=lambda p: {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": p.expert_bias,
        "moe_router_bias_update_rate": p.bias_update_rate,
    },
    builder=lambda p: TopKRouter,
)
