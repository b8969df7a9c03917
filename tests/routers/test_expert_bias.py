"""Aux-loss-free balancing (`expert_bias: true`) on softmax and sigmoid token-choice routers: the
bias moves a skewed load toward balance, the router weights' gradients exclude it, and it is
saved with checkpoints.

Run: pytest tests/routers/test_expert_bias.py
"""

import pytest
import torch

from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE
from .conftest import hidden, make_router

ROUTERS = [("topk_softmax", {}), ("topk_softmax", {"order": "topk_softmax"}),
           ("topk_sigmoid", {}), ("group_limited", {"score": "softmax"})]


def max_over_mean(routing_map):
    load = routing_map.sum(dim=0).float()
    return (load.max() / load.mean()).item()


@pytest.mark.parametrize("name,params", ROUTERS)
def test_bias_moves_a_skewed_load_toward_balance(world, name, params):
    router = make_router(name, expert_bias=True, bias_update_rate=0.002, **params)
    h = hidden(seq=32, batch=4, skew=5.0).detach()
    imbalance = []
    with torch.no_grad():
        for _ in range(300):
            _, routing_map = router(h, None)
            imbalance.append(max_over_mean(routing_map))
            router.update_expert_bias(routing_map.sum(dim=0))
    # sign updates of a fixed size end in a small oscillation around balance
    settled = sum(imbalance[-50:]) / 50
    assert imbalance[0] > 2.5 and settled < 1.6, (imbalance[0], settled)
    assert "expert_bias" in router.state_dict()  # saved with checkpoints
    assert all("expert_bias" not in n for n, _ in router.named_parameters())


@pytest.mark.parametrize("name,params", ROUTERS)
def test_router_weight_gradients_exclude_the_bias(world, name, params):
    router = make_router(name, expert_bias=True, **params)
    router.expert_bias.copy_(torch.randn(8))  # large enough to change the choice
    h = hidden()
    probs, routing_map = router(h, None)
    unbiased_map = make_router(name, **params)
    unbiased_map.load_state_dict(router.state_dict(), strict=False)
    assert not torch.equal(routing_map, unbiased_map(h, None)[1])
    upstream = torch.randn_like(probs)
    (probs * upstream).sum().backward()
    grad = router.weight.grad.clone()
    # reference: the same experts, weighted by the unbiased scores, with no bias anywhere
    router.weight.grad = None
    logits = router.gating(h).view(-1, 8)
    scores = torch.sigmoid(logits) if name == "topk_sigmoid" else torch.softmax(logits, dim=-1)
    chosen = scores * routing_map
    if name == "topk_sigmoid" or params.get("order") == "topk_softmax":
        chosen = chosen / chosen.sum(dim=-1, keepdim=True)
    (chosen * upstream).sum().backward()
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, router.weight.grad, atol=1e-6)


@pytest.mark.slow
def test_the_bias_is_checkpointed_stop_and_resume_equals_a_straight_run(tmp_path):
    args = ["training.max_steps=6", "training.log_interval=1", "optimizer.warmup_steps=1",
            "moe.router.expert_bias=true", "moe.router.bias_update_rate=0.01",
            "moe.balance.aux=0"]

    def train(run_dir, *extra):
        result = run_cli(["train", TINY_MOE, "--run-dir", str(run_dir), *args, *extra])
        assert result.returncode == 0, result.stderr[-3000:]

    train(tmp_path / "straight")
    train(tmp_path / "resumed", "--stop-at-step", "3")
    train(tmp_path / "resumed")
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    for key in ("loss", "moe/layer_00/load_cv", "moe/layer_03/load_max_over_mean"):
        assert [r[key] for r in straight] == [r[key] for r in resumed], key
