"""Every registered router (and a user's class by dotted path) fits megatron's router slot:
built as MoELayer builds it (config=, pg_collection=, is_mtp_layer=), called as MoELayer calls it
(forward(hidden_states, padding_mask)), and trained inside the tiny GPTModel.

Run: pytest tests/routers/test_contract.py
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from moe_lab.model import build_model, build_transformer_config
from moe_lab.routers import registered_names, resolve_router, token_ids

from .conftest import EXPERTS, hidden, make_router, tiny_cfg

NAMES = [*registered_names(), "tests.routers.crafted:CraftedRouter"]


def test_every_router_file_is_registered():
    assert set(registered_names()) == {"topk_softmax", "topk_sigmoid", "group_limited",
                                       "expert_choice", "hash", "sinkhorn", "random"}


@pytest.mark.parametrize("name", NAMES)
def test_router_as_moe_layer_calls_it(world, name):
    router = make_router(name)
    seq, batch = 8, 2
    token_ids.publish(torch.randint(256, (batch, seq)))
    probs, routing_map = router(hidden(seq, batch), None)
    assert probs.shape == routing_map.shape == (seq * batch, EXPERTS)
    assert routing_map.dtype == torch.bool and torch.isfinite(probs).all()
    assert (probs[~routing_map] == 0).all() and (probs[routing_map] > 0).all()
    if probs.requires_grad:  # fixed routers (hash, random) have no gradient to give
        probs.sum().backward()


@pytest.mark.parametrize("name", NAMES)
def test_router_trains_inside_the_model(world, name):
    cfg = tiny_cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg, build_transformer_config(cfg, use_cpu_initialization=True))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    router_class = resolve_router(cfg.moe.router, cfg).builder().func
    assert len(layers) == 4 and all(type(m.router) is router_class for m in layers)
    tokens = torch.randint(cfg.model.vocab_size, (2, 16))
    positions = torch.arange(16).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)
    token_ids.clear()
