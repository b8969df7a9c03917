"""Routers: chosen by name in `moe.router`, each one file, registered in `registry`.

A router contributes two things to the model builder: the `RouterBuilder` that megatron-core's
`MoESubmodules.router` slot calls, and the TransformerConfig fields it reads.
"""

from moe_lab.routers.registry import RouterChoice, resolve_router
from moe_lab.routers import topk  # noqa: F401  (registers topk_softmax, topk_sigmoid)

__all__ = ["RouterChoice", "resolve_router"]
