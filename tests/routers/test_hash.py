"""hash: routing is a fixed function of the token id, blind to hidden states; the token-id
channel lays ids out like the router's tokens.

Run: pytest tests/routers/test_hash.py
"""

import pytest
import torch

from moe_lab.model import build_model, build_transformer_config
from moe_lab.routers import token_ids
from moe_lab.routers.hash import hash_experts

from .conftest import hidden, make_router, tiny_cfg


def test_deterministic_and_blind_to_hidden_states(world):
    router = make_router("hash")
    ids = torch.randint(256, (4, 16))  # [batch, seq]
    token_ids.publish(ids)
    p1, m1 = router(hidden(seed=1), None)
    p2, m2 = router(hidden(seed=2) * 100, None)
    assert torch.equal(m1, m2) and torch.equal(p1, p2)
    assert (m1.sum(dim=-1) == 2).all() and torch.allclose(p1[m1], torch.tensor(0.5))
    # the same id takes the same experts wherever it stands; router order is [seq, batch]
    flat = ids.t().reshape(-1)
    for token in flat.unique()[:20]:
        rows = m1[flat == token]
        assert (rows == rows[0]).all()
    assert torch.equal(m1, torch.zeros_like(m1).scatter(1, hash_experts(flat, 8, 2), True))


def test_no_gradient_reaches_the_frozen_gate(world):
    router = make_router("hash")
    token_ids.publish(torch.randint(256, (4, 16)))
    probs, _ = router(hidden(), None)
    assert not probs.requires_grad and not router.weight.requires_grad


def test_hash_spreads_the_vocabulary_evenly_and_depends_on_seed():
    experts = hash_experts(torch.arange(8192), 8, 2)
    load = torch.bincount(experts.reshape(-1), minlength=8).float()
    assert (load / load.mean() - 1).abs().max() < 0.1
    assert not torch.equal(experts, hash_experts(torch.arange(8192), 8, 2, seed=1))


def test_channel_errors_name_the_problem(world):
    router = make_router("hash")
    token_ids.clear()
    with pytest.raises(RuntimeError, match="none published"):
        router(hidden(), None)
    token_ids.publish(torch.randint(256, (2, 16)))
    with pytest.raises(RuntimeError, match="32 published for a router call of 64 tokens"):
        router(hidden(), None)
    token_ids.clear()


def test_published_ids_line_up_with_the_embedded_tokens(world):
    """Row i of the router's tokens is the token the embedding embedded at row i."""
    cfg = tiny_cfg("hash")
    model = build_model(cfg, build_transformer_config(cfg, use_cpu_initialization=True))
    embedded = {}
    model.embedding.register_forward_hook(lambda m, args, out: embedded.update(out=out))
    tokens = torch.randint(256, (2, 16))
    model(tokens, torch.arange(16).expand(2, 16), None)
    ids = token_ids.current(32)
    rows = embedded["out"].reshape(32, -1)  # [seq, batch, hidden] as the router flattens it
    assert torch.equal(rows, model.embedding.word_embeddings.weight[ids])
    token_ids.clear()
