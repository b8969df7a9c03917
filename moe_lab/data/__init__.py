"""Training data: batches of token ids for the training loop.

For now deterministic synthetic tokens (`synthetic.py`); indexed datasets come with the data
pipeline.
"""

from moe_lab.data.synthetic import SyntheticTokens, batch_indices

__all__ = ["SyntheticTokens", "batch_indices"]
