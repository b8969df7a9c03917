"""Helpers for router tests: routers built exactly as megatron's MoELayer builds them (the world of
one they run in is tests/conftest.py's `world` fixture)."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from moe_lab import config as C
from moe_lab.model import build_transformer_config
from moe_lab.routers import resolve_router

from ..conftest import TINY_MOE

HIDDEN = 64  # tiny_moe.yaml's hidden_size
EXPERTS = 8


def tiny_cfg(name: str, *overrides: str, **params):
    """The tiny MoE with router `name` and its params; balancing losses off unless overridden."""
    args = [f"moe.router.name={name}", "moe.balance.aux=0"]
    args += [f"moe.router.{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in params.items()]
    return C.load(TINY_MOE, [*args, *overrides])


def make_router(name: str, *overrides: str, **params):
    """A router built the way MoELayer builds it: builder(config=, pg_collection=,
    is_mtp_layer=), then set_layer_number."""
    cfg = tiny_cfg(name, *overrides, **params)
    config = build_transformer_config(cfg, use_cpu_initialization=True)
    torch.manual_seed(0)  # the same gate weights whatever ran before
    builder = resolve_router(cfg.moe.router, cfg).builder()
    router = builder(config=config, pg_collection=get_default_pg_collection(), is_mtp_layer=False)
    router.set_layer_number(1)
    router.train()
    return router


def hidden(seq: int = 16, batch: int = 4, seed: int = 0, skew: float = 0.0) -> torch.Tensor:
    """[seq, batch, hidden] random hidden states; `skew` adds a shared direction to every token,
    so that a router's logits prefer the same experts for all tokens."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(seq, batch, HIDDEN, generator=g)
    if skew:
        h = h + skew * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1234))
    return h.requires_grad_()
