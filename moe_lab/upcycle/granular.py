"""Granular upcycling (He et al., NVIDIA, "Upcycling Large Language Models into Mixture of
Experts", arXiv 2410.07524), as megatron-core 0.19's `upcycling_utils.py` lays experts out.

The dense FFN of F channels is cut into G = F / h_E contiguous shards (integer G only, as in the
paper); each shard is replicated E = N / G times (the expansion rate). Expert i is copy i // G
of shard i % G, so shard g holds channels [g*h_E, (g+1)*h_E). No shuffling, no re-initialisation
(both can still be asked for with upcycle.reinit_fraction). The virtual-group router
(`router_init.py`) and the weight-scaling rule (`plan.py`) complete the method.
"""

from __future__ import annotations

import torch

from moe_lab.config import ConfigError
from moe_lab.upcycle.base import Method, MoEShape, Placement, register_method


def granularity(shape: MoEShape) -> int:
    return shape.dense_ffn // shape.expert_ffn


def _check(shape: MoEShape) -> None:
    if shape.dense_ffn % shape.expert_ffn:
        raise ConfigError(
            f"moe.expert_ffn: granular upcycling needs an integer granularity, but "
            f"model.ffn_hidden_size {shape.dense_ffn} is not a multiple of {shape.expert_ffn} "
            f"(qwen2 upcycling accepts any size)", key="moe.expert_ffn")
    shards = granularity(shape)
    if shape.num_experts % shards:
        raise ConfigError(
            f"moe.num_experts: granular upcycling makes E copies of each of the G = {shards} "
            f"shards, so it must be a multiple of {shards}; got {shape.num_experts}",
            key="moe.num_experts")


def _place(shape: MoEShape, gen: torch.Generator) -> list[Placement]:
    shards, width = granularity(shape), shape.expert_ffn
    placements = []
    for expert in range(shape.num_experts):
        copy, shard = divmod(expert, shards)
        channels = torch.arange(shard * width, (shard + 1) * width)
        placements.append(Placement(copy=torch.full_like(channels, copy), channel=channels,
                                    shard=shard))
    return placements


register_method(Method("granular", _check, _place, default_router_init="virtual-group",
                       granularity=granularity))
