"""A SwiGLU FFN as three tensors whose intermediate channels can be selected, scaled and joined.

Channel c of an FFN is gate row c, up row c and down column c: it contributes
silu(gate[c] . x) * (up[c] . x) * down[:, c] to the output, independently of every other channel.
Selecting a set of channels therefore gives an FFN that computes exactly the sum of those
channels' contributions, which is what every upcycling method builds its experts from.

megatron-core stores gate and up stacked on dim 0 of `linear_fc1.weight` ([2F, H]) and down as
`linear_fc2.weight` ([H, F]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SwiGLU:
    gate: torch.Tensor  # [F, H]
    up: torch.Tensor  # [F, H]
    down: torch.Tensor  # [H, F]

    @classmethod
    def from_megatron(cls, fc1: torch.Tensor, fc2: torch.Tensor) -> "SwiGLU":
        gate, up = fc1.chunk(2, dim=0)
        return cls(gate, up, fc2)

    def to_megatron(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.gate, self.up], dim=0), self.down

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def channels(self, index: torch.Tensor) -> "SwiGLU":
        """A new FFN made of these channels, in this order (new tensors, never views)."""
        return SwiGLU(self.gate.index_select(0, index), self.up.index_select(0, index),
                      self.down.index_select(1, index))

    def scaled(self, scale: float) -> "SwiGLU":
        """Every weight times `scale`. down and up are linear, so the output scales by scale**2
        times silu(scale * g) / silu(g): about scale**3 (exactly where silu is linear)."""
        if scale == 1.0:
            return self
        return SwiGLU(self.gate * scale, self.up * scale, self.down * scale)

    def numel(self) -> int:
        return self.gate.numel() + self.up.numel() + self.down.numel()
