"""Blends through megatron-core's GPTDataset + BlendedMegatronDatasetBuilder, read the way the
training loop reads them: weights in the sampled stream, data order as a function of the step,
DP sharding, and one-line errors for blends that cannot train.

Run: pytest tests/data/test_blend.py
"""

import pytest

from moe_lab import config as C
from moe_lab.config import ConfigError
from moe_lab.data import build_data_source, check_data
from moe_lab.data.bpe import save_tokenizer, train_bpe
from moe_lab.data.tokenizer import load_tokenizer

from ..conftest import TINY_MOE


def blend_config(tokenizer_dir, blend, *extra):
    blend_yaml = "[" + ", ".join(f"[{w}, {p}]" for w, p in blend) + "]"
    return C.load(TINY_MOE, ["model.vocab_size=320", f"data.tokenizer={tokenizer_dir}",
                             f"data.blend={blend_yaml}", "data.split=90,5,5",
                             "training.max_steps=100", *extra])


def token_sets(two_datasets, tokenizer_dir):
    """Token ids each dataset uses, the shared EOD left out."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    eod = load_tokenizer(tokenizer_dir).eod
    sets = {}
    for name, prefix in two_datasets.items():
        dataset = IndexedDataset(prefix)
        sets[name] = {t for i in range(len(dataset)) for t in dataset[i].tolist()} - {eod}
    assert not sets["words"] & sets["digits"]
    return sets, eod


def source_of(sample, sets, eod):
    used = set(sample.tolist()) - {eod}
    owners = [name for name, tokens in sets.items() if used <= tokens]
    assert len(owners) == 1, used
    return owners[0]


@pytest.mark.parametrize("weights", [(0.8, 0.2), (0.5, 0.5), (0.3, 0.7)])
def test_mixture_weights_are_respected_in_the_sampled_stream(tmp_path, tokenizer_dir,
                                                             two_datasets, weights):
    cfg = blend_config(tokenizer_dir, zip(weights, two_datasets.values()))
    source = build_data_source(cfg, tmp_path / "cache")
    sets, eod = token_sets(two_datasets, tokenizer_dir)
    counts = {"words": 0, "digits": 0}
    for step in range(cfg.training.max_steps):
        for batch in source.batches(step, 0, 1):
            for sample in batch["tokens"]:
                counts[source_of(sample, sets, eod)] += 1
    total = sum(counts.values())
    assert total == 100 * cfg.training.global_batch_size
    assert abs(counts["words"] / total - weights[0]) < 0.02, counts
    # The first steps are mixed too, not one dataset after the other.
    first = [source_of(s, sets, eod) for b in source.batches(0, 0, 1) for s in b["tokens"]]
    assert len(set(first)) == 2


def test_data_order_is_a_function_of_the_step(tmp_path, tokenizer_dir, two_datasets):
    """What a resumed run relies on: a fresh source (reading the cached indices) gives the
    same samples at step k as the source that built them, and DP ranks split each step."""
    cfg = blend_config(tokenizer_dir, [(0.6, two_datasets["words"]),
                                       (0.4, two_datasets["digits"])])
    first = build_data_source(cfg, tmp_path / "cache")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any("BlendedDataset-train" in n for n in cached)
    again = build_data_source(cfg, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    for step in (0, 37, 99):
        whole = first.batches(step, 0, 1)
        assert all((a["tokens"] == b["tokens"]).all() and (a["labels"] == b["labels"]).all()
                   for a, b in zip(whole, again.batches(step, 0, 1)))
        halves = again.batches(step, 0, 2) + again.batches(step, 1, 2)
        assert [t.tolist() for b in halves for t in b["tokens"]] == [
            t.tolist() for b in whole for t in b["tokens"]]
    assert not (first.batches(1, 0, 1)[0]["tokens"] == first.batches(0, 0, 1)[0]["tokens"]).all()
    # Labels are the tokens shifted by one, across document boundaries.
    sample = first.batches(5, 0, 1)[0]
    assert (sample["tokens"][:, 1:] == sample["labels"][:, :-1]).all()
    # Another seed is another order.
    reseeded = build_data_source(C.load(TINY_MOE, [*_overrides(cfg), "training.seed=7"]),
                                 tmp_path / "cache")
    assert not (reseeded.batches(0, 0, 1)[0]["tokens"] == first.batches(0, 0, 1)[0]["tokens"]).all()


def _overrides(cfg):
    blend = "[" + ", ".join(f"[{w}, {p}]" for w, p in cfg.data.blend) + "]"
    return ["model.vocab_size=320", f"data.tokenizer={cfg.data.tokenizer}",
            f"data.blend={blend}", "data.split=90,5,5", "training.max_steps=100"]


def test_the_held_out_set_is_fixed_and_disjoint_from_training(tmp_path, tokenizer_dir,
                                                              two_datasets):
    cfg = blend_config(tokenizer_dir, [(1, two_datasets["words"])], "data.valid_samples=16")
    source = build_data_source(cfg, tmp_path / "cache")
    valid = [t.tolist() for b in source.valid_batches(0, 1) for t in b["tokens"]]
    assert len(valid) == 16
    shorter = build_data_source(C.load(TINY_MOE, [*_overrides(cfg), "training.max_steps=20",
                                                  "data.valid_samples=16"]), tmp_path / "c2")
    assert [t.tolist() for b in shorter.valid_batches(0, 1) for t in b["tokens"]] == valid
    train = {tuple(t.tolist()) for s in range(100) for b in source.batches(s, 0, 1)
             for t in b["tokens"]}
    assert not train & {tuple(v) for v in valid}
    # data.valid_blend: a held-out mixture of its own (here: only the other dataset).
    sets, eod = token_sets(two_datasets, tokenizer_dir)
    fixed = build_data_source(C.load(TINY_MOE, [
        *_overrides(cfg), "data.valid_samples=16",
        f"data.valid_blend=[[1, {two_datasets['digits']}]]"]), tmp_path / "cache")
    assert {source_of(t, sets, eod) for b in fixed.valid_batches(0, 1) for t in b["tokens"]} == {
        "digits"}
    assert {source_of(t, sets, eod) for b in fixed.batches(3, 0, 1) for t in b["tokens"]} == {
        "words"}


def test_blends_that_cannot_train_are_refused_in_one_line(tmp_path, tokenizer_dir,
                                                          two_datasets):
    words = two_datasets["words"]
    cases = [
        (["data.blend=[[1, /no/such/prefix]]"], "data.blend: /no/such/prefix.bin/.idx not found"),
        (["model.vocab_size=256"], "model.vocab_size: 256 is smaller than the 320 token ids"),
        (["data.split=100,0,0"], "data.split: '100,0,0' leaves the valid part of"),
        (["training.eval_interval=5", "data.valid_samples=10"],
         "data.valid_samples: 10 is not a multiple of micro_batch_size * data-parallel size = 4"),
    ]
    for extra, expected in cases:
        cfg = blend_config(tokenizer_dir, [(1, words)], *extra)
        with pytest.raises(ConfigError, match=expected.replace("*", r"\*").replace("[", r"\[")):
            check_data(cfg, world_size=1)
    other_tokenizer = save_tokenizer(train_bpe(["other text entirely"] * 10, 300),
                                     tmp_path / "other")
    cfg = C.load(TINY_MOE, ["model.vocab_size=320", f"data.tokenizer={other_tokenizer}",
                            f"data.blend=[[1, {words}]]"])
    with pytest.raises(ConfigError, match=f"data.blend: {words} was prepared with the tokenizer"):
        check_data(cfg, world_size=1)
    with pytest.raises(ConfigError, match="data.tokenizer: is required with data.blend"):
        C.load(TINY_MOE, [f"data.blend=[[1, {words}]]"])
    with pytest.raises(ConfigError, match=r"data.blend\[0\]: must be \[weight > 0, prefix\]"):
        C.load(TINY_MOE, [f"data.blend=[[0, {words}]]", "data.tokenizer=x"])
