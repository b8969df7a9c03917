"""The shared expert and its gate, initialised from the dense FFN.

- Shared expert of H_S channels: the dense FFN unchanged when H_S == F. Otherwise the rule is
  Qwen2's cut for a single expert of H_S channels: ceil(H_S / F) copies of the dense FFN, each
  with its own seeded channel permutation, laid end to end, and the first H_S positions kept
  (H_S < F: a random subset of the dense channels; H_S > F: whole copies plus a random subset).
  The shared expert is never weight-scaled nor re-initialised.
- Gate (Qwen2-MoE's sigmoid(x . w_gate), a [1, H] weight): `zeros` makes the gate exactly 0.5
  for every token at step 0; `normal` uses the model's init N(0, init_std), which keeps it near
  0.5 (x . w is small for normalised x).
"""

from __future__ import annotations

import torch

from moe_lab.upcycle.base import Placement
from moe_lab.upcycle.qwen2 import permuted_cut

GATE_INITS = ("zeros", "normal")


def shared_placement(dense_ffn: int, shared_ffn: int, gen: torch.Generator) -> Placement:
    if shared_ffn == dense_ffn:
        channels = torch.arange(dense_ffn)
        return Placement(copy=torch.zeros_like(channels), channel=channels)
    return permuted_cut(dense_ffn, [shared_ffn], gen)[0]


def init_gate(kind: str, hidden: int, std: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(1, hidden)
    assert kind == "normal", kind
    return torch.empty(1, hidden).normal_(0.0, std, generator=gen)
