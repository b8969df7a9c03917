"""One MoE layer's MLP tensors from one dense FFN: routed experts, router, shared expert, gate.

The steps common to every method: the method places channels (base.Placement), the experts are
taken from the dense tensors channel by channel (never a whole copy of the FFN per expert), then
weight-scaled, then partly re-initialised. Names are relative to the layer's `mlp.` as in
megatron-core's MoELayer with SequentialMLP experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab.upcycle.base import get_method
from moe_lab.upcycle.plan import UpcyclePlan
from moe_lab.upcycle.reinit import reinitialise
from moe_lab.upcycle.rng import generator, stream_seed
from moe_lab.upcycle.router_init import init_router
from moe_lab.upcycle.shared import init_gate, shared_placement
from moe_lab.upcycle.swiglu import SwiGLU

STREAMS = ("channels", "reinit", "router", "shared", "gate")


@dataclass
class UpcycledMLP:
    tensors: dict[str, torch.Tensor]  # relative to `decoder.layers.{i}.mlp.`
    report: dict


def upcycle_mlp(dense: SwiGLU, plan: UpcyclePlan, layer: int) -> UpcycledMLP:
    method = get_method(plan.method)
    placements = method.place(plan.shape, generator(plan.seed, layer, "channels"))
    reinit_gen = generator(plan.seed, layer, "reinit")
    tensors, experts = {}, []
    for index, placement in enumerate(placements):
        expert = dense.channels(placement.channel).scaled(plan.weight_scale)
        fresh = reinitialise(expert, plan.reinit, reinit_gen)
        fc1, fc2 = fresh.ffn.to_megatron()
        tensors[f"experts.local_experts.{index}.linear_fc1.weight"] = fc1
        tensors[f"experts.local_experts.{index}.linear_fc2.weight"] = fc2
        entry = {"expert": index, "segments": placement.segments(),
                 "reinit_fraction": fresh.fraction}
        if placement.shard is not None:
            entry["shard"] = placement.shard
        if fresh.channels is not None:
            entry["reinit_channels"] = fresh.channels
        experts.append(entry)
    tensors["router.weight"] = init_router(
        plan.router_init, plan.shape.num_experts, plan.hidden, plan.init_std,
        generator(plan.seed, layer, "router"), plan.granularity)
    report = {"layer": layer,
              "copies": max(int(p.copy.max()) for p in placements) + 1,
              "stream_seeds": {s: stream_seed(plan.seed, layer, s) for s in STREAMS},
              "experts": experts}
    if plan.shared_ffn:
        shared = shared_placement(plan.shape.dense_ffn, plan.shared_ffn,
                                  generator(plan.seed, layer, "shared"))
        fc1, fc2 = dense.channels(shared.channel).to_megatron()
        tensors["shared_experts.linear_fc1.weight"] = fc1
        tensors["shared_experts.linear_fc2.weight"] = fc2
        report["shared_expert"] = {"segments": shared.segments()}
        if plan.shared_gate:
            tensors["shared_experts.gate_weight"] = init_gate(
                plan.shared_gate_init, plan.hidden, plan.init_std,
                generator(plan.seed, layer, "gate"))
    return UpcycledMLP(tensors, report)
