"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): every expert is a full copy of
the dense FFN, so moe.expert_ffn must equal model.ffn_hidden_size.

Expert i is copy i, channels in their dense order. This is granular upcycling with one shard
(G = 1), which is how NVIDIA's weight-scaling rule and the virtual-group router apply to it.
"""

from __future__ import annotations

import torch

from moe_lab.config import ConfigError
from moe_lab.upcycle.base import Method, MoEShape, Placement, register_method


def _check(shape: MoEShape) -> None:
    if shape.expert_ffn != shape.dense_ffn:
        raise ConfigError(
            f"moe.expert_ffn: sparse upcycling copies the whole dense FFN, so it must equal "
            f"model.ffn_hidden_size {shape.dense_ffn}; got {shape.expert_ffn}",
            key="moe.expert_ffn")


def _place(shape: MoEShape, gen: torch.Generator) -> list[Placement]:
    channels = torch.arange(shape.dense_ffn)
    return [Placement(copy=torch.full_like(channels, i), channel=channels, shard=0)
            for i in range(shape.num_experts)]


register_method(Method("sparse", _check, _place, default_router_init="normal",
                       granularity=lambda shape: 1))
