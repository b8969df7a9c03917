"""`random`: each token takes k distinct experts uniformly at random, weighted 1/k: the baseline
a learned router has to beat. THOR (Zuo et al. 2022, arXiv 2110.04260) trains with randomly
chosen experts and reports it competitive with learned routing.

The draw comes from torch's default generator of the device, whose state megatron's activation
recompute saves and restores, so a recomputed layer routes the same way. The gate weight is
frozen (nothing trains it) and not computed; balancing losses do not apply.
"""

from __future__ import annotations

import torch

from moe_lab.routers.base import FixedRouter, Selection
from moe_lab.routers.registry import register_router_class


class RandomRouter(FixedRouter):
    def select(self, logits: torch.Tensor) -> Selection:
        draw = torch.rand(logits.shape, device=logits.device)
        return self.fixed_selection(torch.topk(draw, k=self.topk, dim=-1).indices, logits)


register_router_class("random", RandomRouter)
