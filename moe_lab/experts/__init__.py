"""Expert MLP backends for megatron-core's `MoESubmodules.experts` slot.

`grouped.GroupedGemmExperts` holds all local experts' weights as two 3-D tensors and runs each
projection as one `torch.nn.functional.grouped_mm` call, with no per-expert Python loop and no
host synchronisation: the `torch` backend. `local_dispatch.TorchMoELayer` is the torch backend's
MoE layer: with one expert rank it sorts tokens to experts without waiting for the host either.
The `local` backend uses megatron's SequentialMLP and the `te` backend Transformer Engine's
TEGroupedMLP.
"""

from moe_lab.experts.grouped import GroupedGemmExperts
from moe_lab.experts.local_dispatch import LocalTokenDispatcher, TorchMoELayer

__all__ = ["GroupedGemmExperts", "LocalTokenDispatcher", "TorchMoELayer"]
