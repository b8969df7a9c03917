"""topk_softmax: k experts per token, the weights each order and normalisation define, and
gradients that reach the router weights.

Run: pytest tests/routers/test_topk_softmax.py
"""

import pytest
import torch

from .conftest import hidden, make_router


def route(router, seed=0):
    h = hidden(seed=seed)
    probs, routing_map = router(h, None)
    return h, router.gating(h).view(-1, 8).detach(), probs, routing_map


@pytest.mark.parametrize("params", [{}, {"norm_topk_prob": True}, {"order": "topk_softmax"}])
def test_exactly_k_experts_per_token_the_top_k_of_the_softmax(world, params):
    router = make_router("topk_softmax", **params)
    for seed in range(3):
        _, logits, probs, routing_map = route(router, seed)
        assert (routing_map.sum(dim=-1) == 2).all()
        top = torch.topk(logits, 2, dim=-1).indices
        assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, top, True))


def test_weights_keep_their_softmax_share_without_norm_topk_prob(world):
    _, logits, probs, routing_map = route(make_router("topk_softmax"))
    full = torch.softmax(logits, dim=-1)
    assert torch.allclose(probs[routing_map], full[routing_map])
    assert (probs.sum(dim=-1) < 1).all()


def test_norm_topk_prob_and_topk_then_softmax_are_the_same_function(world):
    norm = make_router("topk_softmax", norm_topk_prob=True)
    mixtral = make_router("topk_softmax", order="topk_softmax")
    mixtral.load_state_dict(norm.state_dict())
    h = hidden()
    p_norm, _ = norm(h, None)
    p_mix, _ = mixtral(h, None)
    assert torch.allclose(p_norm.sum(dim=-1), torch.ones(64))
    assert torch.allclose(p_norm, p_mix, atol=1e-6)
    weights = torch.randn(64, 8)
    (p_norm * weights).sum().backward()
    (p_mix * weights).sum().backward()
    assert norm.weight.grad.abs().sum() > 0
    assert torch.allclose(norm.weight.grad, mixtral.weight.grad, atol=1e-6)


def test_gradients_reach_the_router_weights(world):
    router = make_router("topk_softmax")
    h, _, probs, _ = route(router)
    probs.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert h.grad.abs().sum() > 0
