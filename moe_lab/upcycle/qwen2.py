"""Qwen2's upcycling (Qwen2 technical report, arXiv 2407.10671, "Expert Initialization"), used to
initialise Qwen2-57B-A14B's experts from Qwen2-7B.

For N experts of h_E channels from a dense FFN of F channels:
1. replicate the FFN ceil(N * h_E / F) times;
2. shuffle each copy's channels with its own seeded permutation (gate row, up row and down
   column move together, so every copy still computes the dense function);
3. cut the copies, laid end to end, into consecutive slices of h_E channels: expert j takes
   positions [j*h_E, (j+1)*h_E); the channels left at the end are discarded.
Any h_E works: when F is not a multiple of h_E an expert spans the end of one copy and the start
of the next. Step 4, re-initialising a fraction of each expert, is common to all methods
(`reinit.py`); the report's text suggests 50%, our default for this method.
"""

from __future__ import annotations

import torch

from moe_lab.upcycle.base import Method, MoEShape, Placement, ceil_div, register_method


def permuted_cut(dense_ffn: int, widths: list[int], gen: torch.Generator) -> list[Placement]:
    """Steps 1-3 for slices of the given widths, in order."""
    copies = ceil_div(sum(widths), dense_ffn)
    order = torch.cat([torch.randperm(dense_ffn, generator=gen) for _ in range(copies)])
    copy_of = torch.arange(copies * dense_ffn) // dense_ffn
    placements, start = [], 0
    for width in widths:
        end = start + width
        placements.append(Placement(copy=copy_of[start:end].clone(),
                                    channel=order[start:end].clone()))
        start = end
    return placements


def _check(shape: MoEShape) -> None:
    """Any expert size works."""


def _place(shape: MoEShape, gen: torch.Generator) -> list[Placement]:
    return permuted_cut(shape.dense_ffn, [shape.expert_ffn] * shape.num_experts, gen)


register_method(Method("qwen2", _check, _place, default_router_init="normal"))
