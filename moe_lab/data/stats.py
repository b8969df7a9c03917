"""Corpus statistics read back from prepared datasets: token counts and unigram entropy.

The unigram entropy (nats per token) is the loss of a model that knows only how often each
token occurs; a language model that learned anything beyond that is below it.
"""

from __future__ import annotations

import numpy as np


def token_counts(prefix: str, vocab_size: int | None = None) -> np.ndarray:
    """How often each token id occurs in PREFIX.bin (EOD included)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    tokens = np.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r")
    return np.bincount(tokens, minlength=vocab_size or 0)


def unigram_entropy(prefixes: list[str], weights: list[float] | None = None) -> float:
    """Entropy in nats of the token distribution of a blend: each part's distribution mixed
    with its weight (default: in proportion to its tokens, i.e. the concatenation)."""
    counts = [token_counts(p) for p in prefixes]
    size = max(len(c) for c in counts)
    counts = [np.pad(c, (0, size - len(c))).astype(np.float64) for c in counts]
    if weights is None:
        weights = [c.sum() for c in counts]
    total = sum(weights)
    probs = sum((w / total) * (c / c.sum()) for w, c in zip(weights, counts))
    probs = probs[probs > 0]
    return float(-(probs * np.log(probs)).sum())
