"""Routers: chosen by name in `moe.router` (or a user's class by `module.path:Class`), each one
file registered in `registry`, plus the telemetry of what they routed.

A router contributes the `RouterBuilder` that megatron-core's `MoESubmodules.router` slot calls
and the TransformerConfig fields it reads. moe-lab's own routers subclass `base.LabRouter`
(megatron's TopKRouter with the selection made pluggable).
"""

from moe_lab.routers import (  # noqa: F401  (each module registers its router)
    expert_choice,
    group_limited,
    hash,
    random,
    sinkhorn,
    topk_sigmoid,
    topk_softmax,
)
from moe_lab.routers.registry import RouterChoice, registered_names, resolve_router
from moe_lab.routers.telemetry import MoETelemetry, RoutingLoad

__all__ = ["MoETelemetry", "RouterChoice", "RoutingLoad", "registered_names", "resolve_router"]
