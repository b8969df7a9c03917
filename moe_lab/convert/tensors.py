"""One mapping between Hugging Face tensors and one megatron tensor, and how values move across.

A `TensorMap` says: the megatron element `mcore` (a dist-checkpoint tensor, or one layer/expert
of a stacked one: see `mcore_keys`) is built from the HF tensors `hf` by `transform`, and the
inverse gives them back bit for bit. Three transforms cover Qwen2 and Qwen2-MoE:

- `COPY`: the same tensor on both sides (norms, embeddings, o_proj, down_proj, router, gates).
- `GLU`: megatron's SwiGLU `linear_fc1` stacks gate over up: [gate_proj; up_proj].
- `GroupedQKV`: megatron's `linear_qkv` orders rows by query group, each group holding its query
  heads, then its key head, then its value head; HF keeps q_proj, k_proj, v_proj apart.

Shapes are part of the mapping, so a wrong shape is found from file headers before any data is
read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Shape = tuple[int, ...]


class Copy:
    """The same tensor on both sides."""

    def mcore_shape(self, hf_shapes: tuple[Shape, ...]) -> Shape:
        return hf_shapes[0]

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        return hf[0]

    def to_hf(self, mcore: torch.Tensor) -> list[torch.Tensor]:
        return [mcore]

    def __repr__(self):
        return "copy"


class GLU:
    """SwiGLU's two input projections, gate rows first: [gate_proj; up_proj]."""

    def mcore_shape(self, hf_shapes: tuple[Shape, ...]) -> Shape:
        (gate_rows, *rest), _ = hf_shapes
        return (2 * gate_rows, *rest)

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(hf, dim=0)

    def to_hf(self, mcore: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.chunk(mcore, 2, dim=0))

    def __repr__(self):
        return "glu"


@dataclass(frozen=True)
class GroupedQKV:
    """Q, K, V (weights or biases) interleaved by query group, as megatron's linear_qkv holds them.

    Query head h belongs to group h // (heads / groups), as in HF's repeat_kv.
    """

    heads: int
    groups: int
    head_dim: int

    @property
    def _split(self) -> list[int]:
        return [self.heads // self.groups * self.head_dim, self.head_dim, self.head_dim]

    def mcore_shape(self, hf_shapes: tuple[Shape, ...]) -> Shape:
        rest = hf_shapes[0][1:]
        return ((self.heads + 2 * self.groups) * self.head_dim, *rest)

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        rest = hf[0].shape[1:]
        per_group = [t.reshape(self.groups, -1, *rest) for t in hf]
        return torch.cat(per_group, dim=1).reshape(-1, *rest)

    def to_hf(self, mcore: torch.Tensor) -> list[torch.Tensor]:
        rest = mcore.shape[1:]
        grouped = mcore.reshape(self.groups, sum(self._split), *rest)
        return [part.reshape(-1, *rest) for part in torch.split(grouped, self._split, dim=1)]

    def __repr__(self):
        return f"qkv({self.heads} heads, {self.groups} groups)"


COPY = Copy()
GLU_STACK = GLU()


@dataclass(frozen=True)
class TensorMap:
    """Megatron element `mcore` <-> HF tensors `hf` (with their shapes) through `transform`.

    `mcore_aliases` are other names the same element has in checkpoints written by another
    layer spec (e.g. the te backend keeps a MoE layer's pre-MLP norm under its own name).
    """

    mcore: str
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    transform: object = COPY
    mcore_aliases: tuple[str, ...] = field(default=())

    @property
    def mcore_shape(self) -> Shape:
        return tuple(self.transform.mcore_shape(self.hf_shapes))

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        return self.transform.to_mcore(hf)

    def to_hf(self, mcore: torch.Tensor) -> dict[str, torch.Tensor]:
        # Each output is its own contiguous tensor: safetensors refuses views sharing storage.
        return {name: t.contiguous().clone()
                for name, t in zip(self.hf, self.transform.to_hf(mcore))}


def copy_map(mcore: str, hf: str, shape: Shape, aliases: tuple[str, ...] = ()) -> TensorMap:
    return TensorMap(mcore, (hf,), (tuple(shape),), COPY, aliases)
