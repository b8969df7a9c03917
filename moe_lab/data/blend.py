"""Training on prepared datasets: megatron-core's GPTDataset per prefix, mixed by weight with
BlendedMegatronDatasetBuilder.

The train split holds training.max_steps * global_batch_size samples (drawn across document
boundaries, shuffled with training.seed); step s trains on samples [s*G, (s+1)*G) of it, so the
order is a function of the step alone and a resumed run continues exactly where it stopped.
The valid split's first data.valid_samples samples are the fixed held-out set.
Index caches live in `cache_dir` (the run directory's data_cache/); megatron builds them on
rank 0 first, then the other ranks read them.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from megatron.core.tokenizers import MegatronTokenizerBase

from moe_lab.config import ConfigError, ExperimentConfig
from moe_lab.data.synthetic import batch_indices
from moe_lab.data.tokenizer import TextTokenizer

TRAIN, VALID, TEST = 0, 1, 2  # megatron.core.datasets.utils.Split values


class IndexedSource:
    """Samples of the train blend and of the held-out blend; `batches()` and `valid_batches()`
    as the loop reads them. `train_blend` None builds only the held-out set (evaluation)."""

    def __init__(self, cfg: ExperimentConfig, tokenizer: TextTokenizer, cache_dir: Path,
                 train_blend: list[list] | None, valid_blend: list[list]):
        t = cfg.training
        self.global_batch, self.micro_batch = t.global_batch_size, t.micro_batch_size
        self.valid_samples = cfg.data.valid_samples
        train_samples = t.max_steps * t.global_batch_size if train_blend else 0
        if train_blend == valid_blend:
            splits = build_splits(cfg, tokenizer, cache_dir, train_blend, train_samples,
                                  self.valid_samples)
            self.train, self.valid = splits[TRAIN], splits[VALID]
        else:  # a fixed held-out mixture, e.g. to compare runs trained on different mixtures
            self.train = build_splits(cfg, tokenizer, cache_dir, train_blend, train_samples,
                                      0)[TRAIN] if train_blend else None
            self.valid = build_splits(cfg, tokenizer, cache_dir, valid_blend, 0,
                                      self.valid_samples)[VALID]

    def batches(self, step: int, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        """This DP rank's micro-batches of global step `step`."""
        indices = batch_indices(step, self.global_batch, dp_rank, dp_size, self.micro_batch)
        return [_stack(self.train, i) for i in indices]

    def valid_batches(self, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        """This DP rank's share of the held-out set, in micro-batches."""
        indices = batch_indices(0, self.valid_samples, dp_rank, dp_size, self.micro_batch)
        return [_stack(self.valid, i) for i in indices]


def build_splits(cfg: ExperimentConfig, tokenizer: TextTokenizer, cache_dir: Path,
                 blend: list[list], train_samples: int, valid_samples: int) -> list:
    """[train, valid, None] datasets of one blend; a split asked for 0 samples is None."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    weights = [float(w) for w, _ in blend]
    prefixes = [str(p) for _, p in blend]
    config = GPTDatasetConfig(
        random_seed=cfg.training.seed, sequence_length=cfg.training.seq_length,
        blend=(prefixes, weights if len(prefixes) > 1 else None), split=cfg.data.split,
        path_to_cache=str(cache_dir), tokenizer=MegatronTokenizerView(tokenizer),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False)  # the model applies its own causal mask
    # Splits we do not read are not built: an empty one would make GPTDataset loop forever.
    sizes = [train_samples, valid_samples, 0]
    for split, size in enumerate(sizes):
        if not size:
            config.split_matrix[split] = None
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


class MegatronTokenizerView(MegatronTokenizerBase):
    """The tokenizer as megatron's GPTDatasetConfig sees it: vocabulary size (token dtype), EOD
    and pad ids, and `unique_identifiers`, which key the index caches (so a cache built with
    another tokenizer is never reused)."""

    def __init__(self, tokenizer: TextTokenizer):
        super().__init__(tokenizer.path, {"library": "moe-lab"})
        self.text_tokenizer = tokenizer

    def tokenize(self, text: str) -> list[int]:
        return self.text_tokenizer.encode([text])[0]

    def detokenize(self, ids: list[int]) -> str:
        return self.text_tokenizer.decode(ids)

    @property
    def vocab(self) -> dict[str, int]:
        return self.text_tokenizer.vocab

    @property
    def vocab_size(self) -> int:
        return self.text_tokenizer.vocab_size

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pre-training data has no chat template")

    @property
    def eod(self) -> int:
        return self.text_tokenizer.eod

    @property
    def pad(self) -> int:
        # Samples run across document boundaries, so nothing is padded; -1 is megatron's
        # "no pad token" id.
        return -1

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls="moe_lab.TextTokenizer",
                           fingerprint=self.text_tokenizer.fingerprint)


def check_blend(cfg: ExperimentConfig, tokenizer: TextTokenizer, blend: list[list],
                key: str) -> None:
    """One-line errors for a blend that cannot train: missing files, another tokenizer's data,
    a vocabulary larger than the model's, a split share with no documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moe_lab.data.prepare import read_stats

    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"{tokenizer.vocab_size} token ids of data.tokenizer {tokenizer.path}",
                          key="model.vocab_size")
    for _, prefix in blend:
        if not IndexedDataset.exists(prefix):
            raise ConfigError(f"{key}: {prefix}.bin/.idx not found (prepare it with "
                              "`moe-lab data prepare`)", key=key)
        stats = read_stats(prefix)
        if stats and stats.get("tokenizer_fingerprint") != tokenizer.fingerprint:
            raise ConfigError(f"{key}: {prefix} was prepared with the tokenizer "
                              f"{stats.get('tokenizer')}, not data.tokenizer {tokenizer.path}",
                              key=key)
        documents = len(IndexedDataset(prefix))
        for name, index in (("train", TRAIN), ("valid", VALID)):
            start, end = _split_bounds(cfg.data.split, index, documents)
            if end <= start:
                raise ConfigError(f"data.split: {cfg.data.split!r} leaves the {name} part of "
                                  f"{prefix} ({documents} documents) empty", key="data.split")


def _split_bounds(split: str, index: int, documents: int) -> tuple[int, int]:
    """Document range of one split, as megatron's builder computes it."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[index]
    if bounds is None:
        return 0, 0
    return int(round(bounds[0] * documents)), int(round(bounds[1] * documents))


def _stack(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    return {"tokens": torch.stack([s["tokens"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples])}
