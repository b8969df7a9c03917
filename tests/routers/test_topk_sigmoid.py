"""topk_sigmoid: k experts per token by sigmoid score, renormalised weights, gradients.

Run: pytest tests/routers/test_topk_sigmoid.py
"""

import torch

from .conftest import hidden, make_router


def test_top_k_sigmoid_scores_renormalised(world):
    router = make_router("topk_sigmoid")
    for seed in range(3):
        h = hidden(seed=seed)
        probs, routing_map = router(h, None)
        scores = torch.sigmoid(router.gating(h).view(-1, 8)).detach()
        top = torch.topk(scores, 2, dim=-1).indices
        assert (routing_map.sum(dim=-1) == 2).all()
        assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, top, True))
        chosen = scores.gather(1, top)
        assert torch.allclose(probs.gather(1, top), chosen / chosen.sum(-1, keepdim=True))


def test_gradients_reach_the_router_weights(world):
    router = make_router("topk_sigmoid")
    probs, _ = router(hidden(), None)
    (probs * torch.randn_like(probs)).sum().backward()
    assert router.weight.grad.abs().sum() > 0
