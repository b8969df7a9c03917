"""Deterministic synthetic token sequences that a model can learn.

Sample i is a function of (seed, i) alone: each next token is the previous one plus one of four
fixed offsets (mod vocab), drawn with skewed probabilities. The next-token entropy is about
1.1 nats against ln(vocab) for random tokens, so a working model's loss falls quickly, and any
layout or restart that reads the same sample indices sees the same tokens.
"""

from __future__ import annotations

import torch

_OFFSETS = torch.tensor([1, 3, 7, 13])
_PROBS = torch.tensor([0.55, 0.25, 0.15, 0.05])


class SyntheticTokens:
    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed

    def sample(self, index: int) -> torch.Tensor:
        """seq_length + 1 tokens (inputs and the shifted labels)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = torch.randint(self.vocab_size, (1,), generator=gen)
        steps = _OFFSETS[torch.multinomial(_PROBS, self.seq_length, replacement=True,
                                           generator=gen)]
        return (torch.cat([start, start + steps.cumsum(0)]) % self.vocab_size).long()

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        tokens = torch.stack([self.sample(i) for i in indices])
        return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def batch_indices(step: int, global_batch: int, dp_rank: int, dp_size: int,
                  micro_batch: int) -> list[list[int]]:
    """Sample indices of each micro-batch this data-parallel rank trains on at `step`.

    The global batch of step s is samples [s*G, (s+1)*G); DP rank r takes the r-th contiguous
    slice, so every layout trains on the same samples.
    """
    per_rank = global_batch // dp_size
    start = step * global_batch + dp_rank * per_rank
    return [list(range(start + m, start + m + micro_batch)) for m in range(0, per_rank, micro_batch)]
