"""train/master_remainders.py: the fp32 master weight as the bf16 weight + an int16 remainder,
TE's layout (the bf16 weight rounded to nearest, ties away from zero). The kernel's version is
checked in tests/train/test_master_adamw.py; TE's FusedAdam with it on the GPU in
tests/gpu/test_precision_aware.py."""

import torch

from moe_lab.train.master_remainders import join, split


def _nearest_bf16_ties_away(x: torch.Tensor) -> torch.Tensor:
    """Reference in float64: of the two bf16 numbers around x, the nearer; the one further
    from zero on a tie."""
    toward_zero = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    away = (toward_zero.view(torch.int32) + 0x10000).view(torch.float32)
    x64 = x.double()
    take_away = (x64 - toward_zero.double()).abs() >= (away.double() - x64).abs()
    return torch.where(take_away, away, toward_zero).to(torch.bfloat16)


def test_split_then_join_gives_every_bit_back():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) * torch.logspace(-30, 30, 200_000)
    ties = torch.tensor([1 + 2**-8, -(1 + 2**-8), 3 + 2**-7, 0.0, -0.0, 2**-130])
    x = torch.cat([x, ties])
    weight, remainder = split(x)
    assert weight.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert torch.equal(join(weight, remainder).view(torch.int32), x.view(torch.int32))
    assert torch.equal(weight, _nearest_bf16_ties_away(x))
    # ties go away from zero where torch's cast goes to even
    assert weight[-6:-4].tolist() == [1 + 2**-7, -(1 + 2**-7)]
    assert x[-6:-4].to(torch.bfloat16).tolist() == [1.0, -1.0]


def test_a_fresh_zero_remainder_is_the_weight_itself():
    """TE starts the remainders at zero: the master weight is then the bf16 weight."""
    weight = torch.randn(1000).to(torch.bfloat16)
    master = join(weight, torch.zeros(1000, dtype=torch.int16))
    assert torch.equal(master, weight.float())
    assert torch.equal(split(master)[0], weight)
