"""sinkhorn (S-BASE): the Sinkhorn assignment is balanced where top-k is not; gradients reach
the router weights; evaluation routes by plain top-k.

Run: pytest tests/routers/test_sinkhorn.py
"""

import torch

from .conftest import hidden, make_router


def max_over_mean(routing_map):
    load = routing_map.sum(dim=0).float()
    return (load.max() / load.mean()).item()


def test_assignment_balanced_within_tolerance_on_skewed_input(world):
    for topk in (1, 2):
        sinkhorn = make_router("sinkhorn", f"moe.topk={topk}")
        topk_router = make_router("topk_softmax", f"moe.topk={topk}")
        topk_router.load_state_dict(sinkhorn.state_dict())
        h = hidden(seq=128, batch=8, skew=5.0)
        _, greedy = topk_router(h, None)
        _, balanced = sinkhorn(h, None)
        assert (balanced.sum(dim=-1) == topk).all()
        assert max_over_mean(greedy) > 2.0, max_over_mean(greedy)
        assert max_over_mean(balanced) < 1.3, max_over_mean(balanced)


def test_gradients_reach_the_router_weights(world):
    router = make_router("sinkhorn")
    probs, _ = router(hidden(), None)
    (probs * torch.randn_like(probs)).sum().backward()
    assert router.weight.grad.abs().sum() > 0


def test_evaluation_routes_by_plain_top_k(world):
    router = make_router("sinkhorn").eval()
    h = hidden(skew=5.0)
    with torch.no_grad():
        _, routing_map = router(h, None)
        top = router.gating(h).view(-1, 8).topk(2, dim=-1).indices
    assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, top, True))
