"""Balancing losses combine on any learned router: megatron's aux, seq-aux, global-aux and z-loss
are all computed, logged per layer and reach the router weights; routers without a learned
score refuse them.

Run: pytest tests/routers/test_balance_losses.py
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_metrics_tracker

from moe_lab.config import ConfigError

from .conftest import hidden, make_router

ALL_FOUR = ["moe.balance.aux=0.01", "moe.balance.seq_aux=0.01", "moe.balance.global_aux=0.01",
            "moe.balance.z=0.001"]
MEGATRON_NAMES = {"load_balancing_loss", "seq_load_balancing_loss",
                  "global_load_balancing_loss", "z_loss"}


@pytest.fixture(autouse=True)
def aux_loss_scale():
    """A backward outside megatron's schedules leaves a 0-d loss scale in MoEAuxLossAutoScaler
    that the schedules' later [1]-shaped copy_ rejects: restore it for the tests after these."""
    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = saved


def weight_grad(router, h, upstream):
    router.weight.grad = None
    probs, _ = router(h, None)
    (probs * upstream).sum().backward()
    return router.weight.grad.clone()


@pytest.mark.parametrize("name", ["topk_softmax", "topk_sigmoid", "group_limited"])
def test_all_four_losses_together_are_logged_and_reach_the_router(world, name):
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    plain, combined = make_router(name), make_router(name, *ALL_FOUR)
    h, upstream = hidden(), torch.randn(64, 8)
    without, with_losses = weight_grad(plain, h, upstream), weight_grad(combined, h, upstream)
    recorded = {n for n, e in tracker.metrics.items() if e.values[0] > 0}
    assert MEGATRON_NAMES <= recorded
    assert not torch.allclose(without, with_losses)  # the losses' gradients reached the gate
    tracker.clear()


@pytest.mark.parametrize("name", ["expert_choice", "sinkhorn"])
def test_z_loss_on_routers_that_balance_by_construction(world, name):
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    h, upstream = hidden(), torch.randn(64, 8)
    without = weight_grad(make_router(name), h, upstream)
    with_z = weight_grad(make_router(name, "moe.balance.z=0.01"), h, upstream)
    assert tracker.metrics["z_loss"].values[0] > 0
    assert not torch.allclose(without, with_z)
    tracker.clear()


@pytest.mark.parametrize("name,term", [("expert_choice", "aux"), ("sinkhorn", "seq_aux"),
                                       ("hash", "z"), ("random", "aux")])
def test_routers_refuse_losses_they_cannot_take(name, term):
    with pytest.raises(ConfigError, match=rf"^moe.balance.{term}: router {name} does not take"):
        make_router(name, f"moe.balance.{term}=0.01")
