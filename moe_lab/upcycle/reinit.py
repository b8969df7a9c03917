"""Re-initialising a fraction of an upcycled expert with the model's own init distribution.

Qwen2 re-initialises 50% of each fine-grained expert's parameters so that experts cut from the
same dense FFN start to diverge. The fresh values follow megatron-core's initialisation of the
same weights: gate and up rows N(0, init_std) (`init_method`), down columns
N(0, init_std / sqrt(2 * num_layers)) (`output_layer_init_method`).

- `channel`: exactly round(fraction * h_E) channels, chosen at random, get a fresh gate row,
  up row and down column (the whole channel is new; the others are untouched copies).
- `element`: every element of gate, up and down is re-initialised independently with
  probability `fraction` (the realised fraction is reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab.upcycle.swiglu import SwiGLU


@dataclass(frozen=True)
class Reinit:
    fraction: float
    granularity: str  # "channel" | "element"
    in_std: float  # gate and up
    out_std: float  # down


@dataclass(frozen=True)
class Reinitialised:
    ffn: SwiGLU
    fraction: float  # the fraction of the expert's parameters that are fresh
    channels: list[int] | None  # the fresh channels (channel granularity)


def reinitialise(ffn: SwiGLU, spec: Reinit, gen: torch.Generator) -> Reinitialised:
    """A new FFN with the chosen part re-initialised; `ffn` itself is not modified."""
    if spec.fraction == 0:
        return Reinitialised(ffn, 0.0, [] if spec.granularity == "channel" else None)
    if spec.granularity == "channel":
        return _by_channel(ffn, spec, gen)
    return _by_element(ffn, spec, gen)


def _by_channel(ffn: SwiGLU, spec: Reinit, gen: torch.Generator) -> Reinitialised:
    count = round(spec.fraction * ffn.width)
    chosen = torch.randperm(ffn.width, generator=gen)[:count].sort().values
    gate, up, down = ffn.gate.clone(), ffn.up.clone(), ffn.down.clone()
    hidden = ffn.gate.shape[1]
    gate[chosen] = _normal((count, hidden), spec.in_std, gen, gate.dtype)
    up[chosen] = _normal((count, hidden), spec.in_std, gen, up.dtype)
    down[:, chosen] = _normal((hidden, count), spec.out_std, gen, down.dtype)
    return Reinitialised(SwiGLU(gate, up, down), count / ffn.width, chosen.tolist())


def _by_element(ffn: SwiGLU, spec: Reinit, gen: torch.Generator) -> Reinitialised:
    fresh = 0
    tensors = []
    for tensor, std in ((ffn.gate, spec.in_std), (ffn.up, spec.in_std),
                        (ffn.down, spec.out_std)):
        mask = torch.rand(tensor.shape, generator=gen) < spec.fraction
        tensors.append(torch.where(mask, _normal(tensor.shape, std, gen, tensor.dtype), tensor))
        fresh += int(mask.sum())
    return Reinitialised(SwiGLU(*tensors), fresh / ffn.numel(), None)


def _normal(shape, std: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)
