"""How megatron-core's dist checkpoints name and stack tensors, as seen by the converter.

A dist-checkpoint key names a global tensor, independent of the parallel layout it was saved
from. megatron-core stacks two kinds of tensors along leading axes:

- layers, when every layer has the same structure (a dense model): `decoder.layers.mlp.
  linear_fc2.weight` has shape [num_layers, ...]; with a mixed or MoE pattern each layer has its
  own key, `decoder.layers.3.mlp.linear_fc2.weight`;
- routed experts: `decoder.layers.3.mlp.experts.experts.linear_fc2.weight` has shape
  [num_experts, ...].

The converter works on *elements*: one layer's (and one expert's) tensor, named as if nothing
were stacked, `decoder.layers.3.mlp.experts.5.linear_fc2.weight`. This module is the one place
that knows the stacking rules.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

_LAYERS = "decoder.layers."
_EXPERTS = ".experts.experts."


def stacked_axes(key: str) -> tuple[str, ...]:
    """The leading stacked axes of a checkpoint key, outermost first: "layer", "expert"."""
    axes = []
    if key.startswith(_LAYERS) and not key[len(_LAYERS):].split(".", 1)[0].isdigit():
        axes.append("layer")
    if _EXPERTS in key:
        axes.append("expert")
    return tuple(axes)


def element_name(key: str, indices: Sequence[int]) -> str:
    """The element of `key` at `indices` along its stacked axes."""
    axes = stacked_axes(key)
    assert len(indices) == len(axes), (key, indices)
    name = key
    for axis, index in zip(axes, indices):
        if axis == "layer":
            name = name.replace(_LAYERS, f"{_LAYERS}{index}.", 1)
        else:
            name = name.replace(_EXPERTS, f".experts.{index}.", 1)
    return name


def elements(key: str, global_shape: Sequence[int]) -> Iterator[tuple[str, tuple[int, ...],
                                                                       tuple[int, ...]]]:
    """(element name, indices, element shape) of every element a checkpoint key holds."""
    n = len(stacked_axes(key))
    shape = tuple(global_shape[n:])
    for indices in itertools.product(*(range(size) for size in global_shape[:n])):
        yield element_name(key, indices), tuple(indices), shape
