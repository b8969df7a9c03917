"""The router's initial weight [N, H] (`upcycle.router_init`).

- `zeros`: every expert scores the same for every token; top-k breaks the tie by index.
- `normal`: the model's own init, N(0, init_std), as a MoE trained from scratch starts.
- `virtual-group` (NVIDIA, arXiv 2410.07524): the experts holding copy c of the dense FFN's
  shards (experts c*G ... c*G + G - 1, one per shard) share one random router row r_c. The G
  shards' groups ("virtual groups") thus have identical router weights, every token scores all G
  shards of a copy equally, and top-k with T a multiple of G picks T/G whole copies: each shard
  exactly T/G times, so the routed sum of shard outputs is the dense FFN's output up to the
  routing weights. Needs the granular layout (sparse is its G = 1 case).
"""

from __future__ import annotations

import torch

ROUTER_INITS = ("zeros", "normal", "virtual-group")


def init_router(kind: str, num_experts: int, hidden: int, std: float, gen: torch.Generator,
                granularity: int | None = None) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(num_experts, hidden)
    if kind == "normal":
        return torch.empty(num_experts, hidden).normal_(0.0, std, generator=gen)
    assert kind == "virtual-group" and granularity, (kind, granularity)
    rows = torch.empty(num_experts // granularity, hidden).normal_(0.0, std, generator=gen)
    return rows.repeat_interleave(granularity, dim=0)
