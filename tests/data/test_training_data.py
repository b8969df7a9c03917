"""Training on prepared datasets through the real CLI: exact resume, DP sharding, valid/loss,
`moe-lab eval` (also under a pipeline layout), and the built-in corpus.

Run: pytest tests/data/test_training_data.py
"""

import json
import math
import resource
import time

import pytest

from moe_lab.data.stats import unigram_entropy
from moe_lab.testing import run_cli, run_distributed
from moe_lab.tracking import read_metrics

from ..conftest import REPO, TINY_MOE

BUILTIN = str(REPO / "experiments" / "tiny_moe_builtin.yaml")


def blend_overrides(tokenizer_dir, two_datasets):
    return ["model.vocab_size=320", f"data.tokenizer={tokenizer_dir}",
            f"data.blend=[[0.7, {two_datasets['words']}], [0.3, {two_datasets['digits']}]]",
            "data.split=90,5,5", "data.valid_samples=16", "training.eval_interval=5",
            "training.max_steps=10", "training.log_interval=1", "optimizer.warmup_steps=2"]


def train(args, nproc=1, cwd=None):
    result = run_cli(args, cwd=cwd) if nproc == 1 else run_distributed(nproc, args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tokenizer_dir, two_datasets):
    """10 uninterrupted steps on a 0.7/0.3 blend, valid/loss every 5 steps."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(["train", TINY_MOE, "--run-dir", str(run_dir),
           *blend_overrides(tokenizer_dir, two_datasets)])
    return run_dir


def test_stop_and_resume_on_a_blend_sees_exactly_the_straight_run(straight_run, tmp_path,
                                                                  tokenizer_dir, two_datasets):
    """Stopped at step 6 of 10, mid-epoch of both datasets (80 of their ~200+ samples)."""
    overrides = blend_overrides(tokenizer_dir, two_datasets)
    train(["train", TINY_MOE, "--run-dir", str(tmp_path / "resumed"), *overrides,
           "--stop-at-step", "6"])
    second = train(["train", TINY_MOE, "--run-dir", str(tmp_path / "resumed"), *overrides])
    assert "resumed from" in second.stdout and "at step 6" in second.stdout
    for split, key in (("train", "loss"), ("valid", "valid/loss")):
        straight = read_metrics(straight_run / "metrics.jsonl", split)
        resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl", split)
        assert [r["step"] for r in resumed] == ([5, 10] if split == "valid" else
                                               list(range(1, 11)))
        assert [r[key] for r in resumed] == [r[key] for r in straight]
    assert any("GPTDataset-train" in p.name for p in (straight_run / "data_cache").iterdir())
    # moe-lab eval on the run's last checkpoint gives its last valid/loss.
    evaluated = run_cli(["eval", str(straight_run), "--json"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(straight[-1]["valid/loss"], rel=1e-6)
    assert result["checkpoint"].endswith("step_0000010") and result["samples"] == 16


@pytest.mark.slow
def test_two_data_parallel_ranks_train_on_the_same_samples_as_one(straight_run, tmp_path,
                                                                   tokenizer_dir, two_datasets):
    overrides = blend_overrides(tokenizer_dir, two_datasets)
    result = train(["train", TINY_MOE, "--run-dir", str(tmp_path / "two"), *overrides], nproc=2)
    assert "world 2" in result.stdout
    for split, key in (("train", "loss"), ("valid", "valid/loss")):
        one = read_metrics(straight_run / "metrics.jsonl", split)
        two = read_metrics(tmp_path / "two" / "metrics.jsonl", split)
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5)
    # moe-lab eval in a pipeline layout gives the single-process number for the same weights.
    evaluated = run_distributed(2, ["eval", str(straight_run), "--json", "parallel.pp=2"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    last_valid = read_metrics(straight_run / "metrics.jsonl", "valid")[-1]["valid/loss"]
    assert result["loss"] == pytest.approx(last_valid, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(last_valid), rel=1e-5)


@pytest.fixture(scope="module")
def builtin_corpus(tmp_path_factory):
    """The built-in corpus, prepared by the CLI in a fresh directory: (dir, CPU seconds, stdout).
    CPU time (user + system of the process) bounds the wall time on an idle machine and does
    not depend on how many other jobs share the cores."""
    root = tmp_path_factory.mktemp("builtin")
    started, cpu_before = time.perf_counter(), _children_cpu_seconds()
    result = run_cli(["data", "builtin", "--out", str(root / "data" / "builtin")], cwd=root)
    cpu = _children_cpu_seconds() - cpu_before
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"data builtin: {cpu:.1f} s CPU, {time.perf_counter() - started:.1f} s wall\n"
          f"{result.stdout}")
    return root, cpu, result.stdout


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_builtin_corpus_is_prepared_in_under_two_minutes(builtin_corpus):
    root, cpu_seconds, stdout = builtin_corpus
    assert cpu_seconds < 120
    corpus = root / "data" / "builtin"
    manifest = json.loads((corpus / "corpus.json").read_text())
    assert manifest["files"] > 300 and manifest["vocab_size"] == 2048
    for part in ("code", "text"):
        assert manifest["parts"][part]["documents"] > 300 and (corpus / f"{part}.idx").is_file()
        assert f"{part}: " in stdout
    assert (corpus / "tokenizer" / "tokenizer.json").is_file()
    assert not (root / "data" / "builtin.partial").exists()
    again = run_cli(["data", "builtin", "--out", str(corpus)])
    assert again.returncode == 0 and "already prepared" in again.stdout


def test_tiny_model_beats_the_unigram_entropy_of_the_builtin_corpus(builtin_corpus):
    """valid/loss below the entropy of the blend's token frequencies (what a model that only
    counts tokens achieves), then `moe-lab eval` reproduces the number."""
    root, _, _ = builtin_corpus
    run_dir = root / "run"
    train(["train", BUILTIN, "--run-dir", str(run_dir), "training.max_steps=100",
           "training.eval_interval=50", "training.log_interval=50", "checkpoint.interval=0"],
          cwd=root)  # the config's data paths are relative to the directory moe-lab runs in
    valid = read_metrics(run_dir / "metrics.jsonl", "valid")
    entropy = unigram_entropy([str(root / "data/builtin/code"), str(root / "data/builtin/text")],
                              [0.7, 0.3])
    print(f"unigram entropy {entropy:.3f}; valid/loss {[r['valid/loss'] for r in valid]}")
    assert [r["step"] for r in valid] == [50, 100]
    assert valid[-1]["valid/loss"] < min(entropy, valid[0]["valid/loss"])
    evaluated = run_cli(["eval", str(run_dir), "--data", "data/builtin/code", "--data",
                         "data/builtin/text"], cwd=root)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    lines = evaluated.stdout.strip().splitlines()[-2:]
    assert [line.split(":")[0] for line in lines] == ["data/builtin/code", "data/builtin/text"]
    assert all("valid/loss" in line and "perplexity" in line for line in lines)


def test_data_mixture_sweep_members_are_valid_configs(builtin_corpus, monkeypatch):
    import yaml

    from moe_lab import config as C
    from moe_lab.data import check_data

    sweep = yaml.safe_load((REPO / "experiments" / "data_mixture.yaml").read_text())["sweep"]
    monkeypatch.chdir(builtin_corpus[0])  # where data/builtin is
    weights = set()
    for member in sweep["members"]:
        overrides = {**sweep["overrides"], **{k: v for k, v in member.items() if k != "name"}}
        cfg = C.load(REPO / "experiments" / sweep["base"],
                     [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        check_data(cfg, world_size=1)
        weights.add(tuple(w for w, _ in cfg.data.blend))
        assert cfg.data.valid_blend == sweep["overrides"]["data.valid_blend"]
    assert len(weights) == len(sweep["members"]) >= 2
