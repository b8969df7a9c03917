"""expert_choice: every expert filled exactly to capacity, gradients through the affinities,
and the documented non-causality.

Run: pytest tests/routers/test_expert_choice.py
"""

import math

import pytest
import torch

from moe_lab.config import ConfigError

from .conftest import hidden, make_router


@pytest.mark.parametrize("capacity_factor", [1.0, 2.0, 0.5])
def test_each_expert_takes_exactly_its_capacity(world, capacity_factor):
    router = make_router("expert_choice", capacity_factor=capacity_factor)
    tokens = 64
    capacity = math.ceil(tokens * 2 * capacity_factor / 8)
    for seed in range(3):
        h = hidden(seed=seed, skew=5.0)  # skewed: token choice would overload some experts
        probs, routing_map = router(h, None)
        assert (routing_map.sum(dim=0) == capacity).all()
        scores = torch.softmax(router.gating(h).view(-1, 8), dim=-1).detach()
        assert torch.allclose(probs[routing_map], scores[routing_map])
        # each expert's chosen tokens are its highest-affinity ones
        kth = scores.topk(capacity, dim=0).values[-1]
        assert (scores[routing_map] >= kth.expand_as(scores)[routing_map]).all()


def test_unchosen_tokens_are_reported_dropped(world):
    router = make_router("expert_choice", capacity_factor=0.5)
    _, routing_map = router(hidden(skew=5.0), None)
    row, _ = router.routing_stats.take("cpu")
    unrouted = (~routing_map.any(dim=-1)).sum()
    assert unrouted > 0 and row[8 + 2] == 64 and row[8 + 3] == unrouted


def test_gradients_reach_the_router_weights(world):
    router = make_router("expert_choice")
    probs, _ = router(hidden(), None)
    (probs * torch.randn_like(probs)).sum().backward()
    assert router.weight.grad.abs().sum() > 0


def test_not_causal_a_later_token_changes_an_earlier_tokens_experts(world):
    router = make_router("expert_choice")
    h = hidden(seq=16, batch=1).detach()
    _, before = router(h, None)
    changed = h.clone()
    changed[-1] = changed[-1] * 20  # only the last position of the sequence
    _, after = router(changed, None)
    assert (before[:-1] != after[:-1]).any()


def test_moe_capacity_factor_is_refused(world):
    with pytest.raises(ConfigError, match="moe.capacity_factor: expert_choice sets its own"):
        make_router("expert_choice", "moe.capacity_factor=1.0")
