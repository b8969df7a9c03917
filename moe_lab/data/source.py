"""What the training loop reads: the data source that cfg.data chooses.

An empty data.blend gives synthetic tokens (synthetic.py); a blend gives megatron-core datasets
(blend.py). Both answer `batches(step, dp_rank, dp_size)` (this rank's micro-batches of one
global step) and `valid_batches(dp_rank, dp_size)` (its share of the fixed held-out set) as pure
functions of their arguments, so a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from moe_lab.config import ConfigError, ExperimentConfig
from moe_lab.data.errors import DataError
from moe_lab.data.synthetic import SyntheticTokens, batch_indices

# Held-out synthetic samples are indices no training run reaches.
_SYNTHETIC_VALID_OFFSET = 1 << 40


class DataSource(Protocol):
    def batches(self, step: int, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]: ...

    def valid_batches(self, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]: ...


class SyntheticSource:
    """Synthetic tokens: step s trains on samples [s*G, (s+1)*G); the held-out set is samples
    from far beyond any run's end."""

    def __init__(self, cfg: ExperimentConfig):
        t = cfg.training
        self.tokens = SyntheticTokens(cfg.model.vocab_size, t.seq_length, t.seed)
        self.global_batch, self.micro_batch = t.global_batch_size, t.micro_batch_size
        self.valid_samples = cfg.data.valid_samples

    def batches(self, step: int, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        indices = batch_indices(step, self.global_batch, dp_rank, dp_size, self.micro_batch)
        return [self.tokens.batch(i) for i in indices]

    def valid_batches(self, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        indices = batch_indices(0, self.valid_samples, dp_rank, dp_size, self.micro_batch)
        return [self.tokens.batch([_SYNTHETIC_VALID_OFFSET + i for i in m]) for m in indices]


def build_data_source(cfg: ExperimentConfig, cache_dir: Path, train: bool = True,
                      valid_blend: list[list] | None = None) -> DataSource:
    """The source for cfg; call on every rank. train=False builds only the held-out set (for
    `moe-lab eval`), from `valid_blend` when given, else data.valid_blend or data.blend."""
    valid_blend = valid_blend or cfg.data.valid_blend or cfg.data.blend
    if not valid_blend:
        return SyntheticSource(cfg)
    from moe_lab.data.blend import IndexedSource
    from moe_lab.data.tokenizer import load_tokenizer

    return IndexedSource(cfg, load_tokenizer(cfg.data.tokenizer), cache_dir,
                         train_blend=cfg.data.blend if train else None, valid_blend=valid_blend)


def check_data(cfg: ExperimentConfig, world_size: int, evaluating: bool = False,
               blend: list[list] | None = None) -> None:
    """Refuse, in one line and before any process group starts, data the run could not read.
    `blend` (from `moe-lab eval --data`) replaces the config's blends."""
    if evaluating or cfg.training.eval_interval:
        _check_valid_samples(cfg, cfg.parallel.data_parallel_size(world_size))
    blends = {"--data": blend} if blend else {"data.blend": cfg.data.blend,
                                              "data.valid_blend": cfg.data.valid_blend}
    blends = {key: value for key, value in blends.items() if value}
    if not blends:
        return
    from moe_lab.data.blend import check_blend

    tokenizer = _config_tokenizer(cfg)
    for key, value in blends.items():
        check_blend(cfg, tokenizer, value, key=key)


def _check_valid_samples(cfg: ExperimentConfig, dp_size: int) -> None:
    """Every DP rank evaluates whole micro-batches of the same size."""
    per_step = cfg.training.micro_batch_size * dp_size
    if cfg.data.valid_samples % per_step:
        raise ConfigError(f"data.valid_samples: {cfg.data.valid_samples} is not a multiple of "
                          f"micro_batch_size * data-parallel size = {per_step}",
                          key="data.valid_samples")


def _config_tokenizer(cfg: ExperimentConfig):
    from moe_lab.data.tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer: required to read indexed datasets (the tokenizer "
                          "they were prepared with)", key="data.tokenizer")
    try:
        return load_tokenizer(cfg.data.tokenizer)
    except DataError as err:
        raise ConfigError(f"data.tokenizer: {err}", key="data.tokenizer") from None
