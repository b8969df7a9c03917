"""What an upcycling method is, and the registry of methods by name (`upcycle.method`).

A method decides only where each dense FFN channel goes: for every routed expert, a `Placement`
lists which replica of the dense FFN ("copy") and which dense channel each of the expert's
channels is taken from. Everything else (taking the channels, weight scaling, re-initialisation,
router, shared expert) is common and done by `moe_lab.upcycle.layer`. One file per method
registers itself here: sparse.py, granular.py, qwen2.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moe_lab.config import ConfigError


@dataclass(frozen=True)
class MoEShape:
    """The sizes a method works with."""

    dense_ffn: int  # F: the dense FFN's intermediate size (model.ffn_hidden_size)
    num_experts: int  # N: routed experts per MoE layer
    expert_ffn: int  # h_E: each routed expert's intermediate size
    topk: int  # T: routed experts per token


@dataclass(frozen=True)
class Placement:
    """Where one expert's channels come from: channel i of the expert is dense channel
    `channel[i]` of replica `copy[i]` of the dense FFN. `shard` is set by granular upcycling."""

    copy: torch.Tensor  # [h_E] int64
    channel: torch.Tensor  # [h_E] int64
    shard: int | None = None

    def segments(self) -> list[dict]:
        """Consecutive runs of channels from the same copy, for the report."""
        runs, start = [], 0
        copies = self.copy.tolist()
        for i in range(1, len(copies) + 1):
            if i == len(copies) or copies[i] != copies[start]:
                runs.append({"copy": copies[start],
                             "dense_channels": self.channel[start:i].tolist()})
                start = i
        return runs


@dataclass(frozen=True)
class Method:
    name: str
    # Raises ConfigError naming the key when the shape does not suit the method.
    check: Callable[[MoEShape], None]
    place: Callable[[MoEShape, torch.Generator], list[Placement]]
    default_router_init: str
    # Experts that are G shards of the dense FFN, E copies of each (granular, sparse with G = 1):
    # what the virtual-group router and NVIDIA's weight-scaling rule need. None for other methods.
    granularity: Callable[[MoEShape], int] | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    _METHODS[method.name] = method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"upcycle.method: unknown method {name!r} "
                          f"(valid: {', '.join(sorted(_METHODS))})", key="upcycle.method")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
