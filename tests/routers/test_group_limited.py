"""group_limited: k experts per token, all inside at most group_topk expert groups.

Run: pytest tests/routers/test_group_limited.py
"""

import pytest
import torch

from moe_lab.config import ConfigError

from .conftest import hidden, make_router


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_k_experts_inside_group_topk_groups(world, score):
    router = make_router("group_limited", num_groups=4, group_topk=1, score=score)
    differs = 0
    for seed in range(3):
        h = hidden(seed=seed)
        probs, routing_map = router(h, None)
        assert (routing_map.sum(dim=-1) == 2).all()
        groups_used = routing_map.view(-1, 4, 2).any(dim=-1).sum(dim=-1)
        assert (groups_used == 1).all()  # group_topk = 1: both experts from one group
        logits = router.gating(h).view(-1, 8)
        plain = torch.zeros_like(routing_map).scatter(1, logits.topk(2, dim=-1).indices, True)
        differs += (plain != routing_map).any(dim=-1).sum()
        assert torch.isfinite(probs).all()
    assert differs > 0  # the limit changes some tokens' choice


def test_gradients_reach_the_router_weights(world):
    router = make_router("group_limited")
    probs, _ = router(hidden(), None)
    (probs * torch.randn_like(probs)).sum().backward()
    assert router.weight.grad.abs().sum() > 0


def test_groups_that_cannot_hold_topk_are_refused(world):
    with pytest.raises(ConfigError, match="moe.router.num_groups: 3 does not divide"):
        make_router("group_limited", num_groups=3)
    with pytest.raises(ConfigError, match="moe.router.group_topk"):
        make_router("group_limited", "moe.topk=4", num_groups=4, group_topk=1)
