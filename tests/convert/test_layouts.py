"""Importing into a parallel layout (real torchrun ranks, gloo): the checkpoint written by two
ranks in TP=2 x EP=2 (each rank holds half of every attention and dense/shared MLP matrix and
4 of the 8 experts, and fills only that), equals the single-process import tensor for tensor;
`moe-lab train` started from it in that layout computes transformers' loss on the same batch;
and `moe-lab convert mcore-to-hf` exports the trained run (optimizer state and all) to a
directory transformers loads, with the source's config keys carried over.

Run: pytest tests/convert/test_layouts.py
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moe_lab.convert.mcore_files import checkpoint_elements, load_elements
from moe_lab.data import SyntheticTokens
from moe_lab.testing import run_cli, run_distributed
from moe_lab.testing.hf_models import save_tiny_model
from moe_lab.tracking import read_metrics
from moe_lab.train.checkpoint import latest_checkpoint

from .conftest import import_hf

SEQ, BATCH = 32, 4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny Qwen2-MoE with dense and MoE layers (decoder_sparse_step 2) and its HF model."""
    directory = tmp_path_factory.mktemp("hf") / "moe"
    model = save_tiny_model(directory, True, decoder_sparse_step=2, max_shard_size="200KB")
    return directory, model


@pytest.fixture(scope="module")
def single(world, hf, tmp_path_factory):
    return import_hf(hf[0], tmp_path_factory.mktemp("single") / "mcore")


def hf_loss(model, cfg) -> float:
    """transformers' token-mean cross-entropy on the first global batch moe-lab trains on."""
    batch = SyntheticTokens(cfg.model.vocab_size, SEQ, cfg.training.seed).batch(
        list(range(BATCH)))
    with torch.no_grad():
        logits = model(batch["tokens"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()


@pytest.mark.slow
def test_import_in_a_parallel_layout_equals_one_process_and_trains_from_hf_loss(
        hf, single, world, tmp_path):
    out = tmp_path / "mcore"
    result = run_distributed(2, ["convert", "hf-to-mcore", str(hf[0]), str(out),
                                 "--layout", "tp=2,ep=2"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "layout tp2-pp1-ep2-etp1" in result.stdout

    ours, reference = (checkpoint_elements(latest_checkpoint(d)) for d in (out, single.out))
    assert ours.keys() == reference.keys()
    got = load_elements(latest_checkpoint(out), ours)
    expected = load_elements(latest_checkpoint(single.out), reference)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    run = run_distributed(2, ["train", str(out / "config.yaml"), "--run-dir", str(tmp_path / "run"),
                              "training.max_steps=1", f"training.seq_length={SEQ}",
                              f"training.global_batch_size={BATCH}",
                              "training.micro_batch_size=2", "tracking.enabled=false"])
    assert run.returncode == 0, run.stderr[-4000:]
    assert "world 2" in run.stdout and f"initialised weights from {out}" in run.stdout
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["loss/lm"] == pytest.approx(hf_loss(hf[1], single.cfg), abs=1e-5)

    exported = run_cli(["convert", "mcore-to-hf", str(tmp_path / "run"), str(tmp_path / "back")])
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert f"from {out / 'hf'}" in exported.stdout  # the template found through init_from
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert trained.config.max_position_embeddings == 256  # carried from the source config.json
    original = hf[1].state_dict()
    changed = [n for n, t in trained.state_dict().items() if not torch.equal(t, original[n])]
    assert trained.state_dict().keys() == original.keys() and changed  # one step was taken
