"""random: k distinct experts per token, uniformly, weight 1/k, nothing to train.

Run: pytest tests/routers/test_random.py
"""

import torch

from .conftest import hidden, make_router


def test_k_distinct_experts_uniformly_at_random(world):
    router = make_router("random")
    torch.manual_seed(0)
    h = hidden(seq=256, batch=8)
    probs, routing_map = router(h, None)
    assert (routing_map.sum(dim=-1) == 2).all() and torch.allclose(probs[routing_map],
                                                                    torch.tensor(0.5))
    load = routing_map.sum(dim=0).float()  # 2048 tokens * 2 / 8 = 512 expected each
    assert ((load - 512).abs() < 80).all(), load
    _, again = router(h, None)
    assert not torch.equal(routing_map, again)  # a fresh draw, not a function of h
    assert not probs.requires_grad and not router.weight.requires_grad
