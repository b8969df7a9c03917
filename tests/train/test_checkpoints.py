"""Checkpoints: the manifest, retention, damage detection, and the NaN/Inf guard.

Real single-process runs through the CLI; damaged checkpoints are copies of a real run's.
Run: pytest tests/train/test_checkpoints.py
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from moe_lab import config as config_lib
from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics
from moe_lab.train.resume import (
    NoUsableCheckpoint,
    checkpoints,
    find_resumable,
    latest_checkpoint,
)
from moe_lab.train.faults import Fault
from moe_lab.train import manifest as manifest_lib
from moe_lab.train.manifest import MANIFEST, verify
from moe_lab.train.retention import stale_steps

from ..conftest import TINY_MOE
from .conftest import MLFLOW_RUN_ID, STEPS, train, train_args, same_rows


def saved_config(run_dir, *overrides):
    return config_lib.load(str(run_dir / "config.yaml"), list(overrides))


def test_manifest_describes_the_checkpoint(straight_run):
    ckpt = straight_run / "checkpoints" / f"step_{STEPS:07d}"
    manifest = verify(ckpt, saved_config(straight_run))
    cfg = config_lib.to_dict(saved_config(straight_run))
    samples = STEPS * cfg["training"]["global_batch_size"]
    assert (manifest["step"], manifest["consumed_samples"]) == (STEPS, samples)
    assert manifest["tokens"] == samples * cfg["training"]["seq_length"]
    assert manifest["data"]["next_sample"] == samples
    assert manifest["config_hash"] == hashlib.sha256(
        json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    assert manifest["model_config"]["moe"] == cfg["moe"]
    assert manifest["parallel"] == {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "cp": 1, "dp": 1,
                                    "world_size": 1}
    assert manifest["mlflow_run_id"] == MLFLOW_RUN_ID
    assert manifest["optimizer_format"] == "param_space"
    rng = base64.b64decode(manifest["rng"]["torch_cpu"])
    assert len(rng) == torch.get_rng_state().numel()
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk and ".metadata" in on_disk
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (ckpt / name).stat().st_size
        assert ("sha256" in entry) == (not name.endswith(".distcp"))


def test_retention_keeps_the_last_two_and_every_fourth(straight_run):
    # interval 2, keep_last 2, keep_every 4: of 2..12, keep 10 and 12, and 4 and 8.
    assert list(checkpoints(straight_run)) == [4, 8, 10, 12]
    assert (straight_run / "checkpoints" / "latest").read_text().strip() == "step_0000012"
    assert not list((straight_run / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("steps, current, keep_last, keep_every, deleted", [
    ([2, 4, 6], 6, 0, 0, []),                 # keep_last 0 keeps everything
    ([2, 4, 6, 8], 8, 1, 0, [2, 4, 6]),
    ([2, 4, 6, 8, 10], 10, 2, 4, [2, 6]),
    ([2, 4, 6, 8, 10], 6, 1, 0, [2, 4]),      # 8 and 10 are newer than what was resumed
])
def test_stale_steps(steps, current, keep_last, keep_every, deleted):
    assert stale_steps(steps, current, keep_last, keep_every) == deleted


def _distcp(ckpt):
    return next(ckpt.glob("*.distcp"))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _as_another_models(ckpt):
    """The checkpoint of a model with hidden_size 32, with a consistent manifest."""
    manifest = manifest_lib.read(ckpt)
    manifest["model_config"]["model"]["hidden_size"] = 32
    manifest_lib.write(ckpt, manifest)


DAMAGE = {
    "missing data file": (lambda c: _distcp(c).unlink(), "__0_0.distcp is missing"),
    "truncated data file": (lambda c: _truncate(_distcp(c)), "__0_0.distcp has"),
    "edited metadata": (lambda c: _flip_a_byte(c / ".metadata"),
                        ".metadata does not match its SHA-256"),
    "missing manifest": (lambda c: (c / MANIFEST).unlink(), "manifest.json is missing"),
    "truncated manifest": (lambda c: _truncate(c / MANIFEST),
                           "manifest.json is truncated"),
    "edited manifest": (lambda c: (c / MANIFEST).write_text(
        (c / MANIFEST).read_text().replace('"step": 12', '"step": 13')),
        "manifest.json does not match its own checksum"),
    "another model's checkpoint": (_as_another_models, "model.hidden_size is 32 in"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_for_the_previous(run_copy, damage):
    newest = run_copy / "checkpoints" / "step_0000012"
    spoil, message = DAMAGE[damage]
    spoil(newest)
    (run_copy / "checkpoints" / "step_0000014.tmp").mkdir()  # a save that never finished
    resume = find_resumable(run_copy, saved_config(run_copy))
    assert resume.path.name == "step_0000010" and resume.step == 10
    [(skipped, reason)] = resume.skipped
    assert skipped == newest and message in reason and str(newest) in reason


def test_checkpoint_of_another_model_is_refused_by_name(run_copy):
    other = saved_config(run_copy, "model.hidden_size=32")
    with pytest.raises(NoUsableCheckpoint) as err:
        find_resumable(run_copy, other)
    assert "model.hidden_size is 64 in" in str(err.value)
    assert "step_0000012/manifest.json but 32 in the config" in str(err.value)


def test_resume_skips_a_torn_checkpoint_and_still_equals_the_straight_run(run_copy,
                                                                           straight_run):
    _truncate(_distcp(run_copy / "checkpoints" / "step_0000012"))
    result = train(run_copy)
    assert "warning: skipping checkpoint step_0000012:" in result.stdout
    assert "__0_0.distcp has" in result.stdout
    assert "resumed from" in result.stdout and "step_0000010 at step 10" in result.stdout
    same_rows(run_copy, straight_run)
    verify(run_copy / "checkpoints" / "step_0000012")  # written again, whole


def test_run_without_a_usable_checkpoint_is_refused_and_left_untouched(run_copy):
    for ckpt in checkpoints(run_copy).values():
        _truncate(_distcp(ckpt))
    before = {p: p.stat().st_size for p in run_copy.rglob("*") if p.is_file()}
    result = run_cli(train_args(run_copy))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("moe-lab: error: no checkpoint in")
    assert "step_0000004/__0_0.distcp has" in line
    assert {p: p.stat().st_size for p in run_copy.rglob("*") if p.is_file()} == before


def _tensors(ckpt, tmp_path):
    out = tmp_path / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return {k: v for k, v in torch.load(out, weights_only=False).items()
            if isinstance(v, torch.Tensor)}


def test_nonfinite_gradient_with_skip_leaves_weights_and_optimizer_alone(tmp_path):
    """...and the aux-loss-free expert biases; the skipped step still reports its routing."""
    run = tmp_path / "run"
    result = train(run, "training.max_steps=4", "checkpoint.interval=1",
                   "checkpoint.keep_last=0", "training.on_nonfinite=skip",
                   "moe.router.expert_bias=true", fault="nan@grads:3")
    assert "warning: grad_norm is nan at step 3; update skipped" in result.stdout
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert rows[3]["skipped"] == 1.0 and "skipped" not in rows[4]
    assert all("moe/layer_01/load_cv" in rows[s] for s in (3, 4))
    ckpts = checkpoints(run)
    before, after, later = (_tensors(ckpts[s], tmp_path) for s in (2, 3, 4))
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in before)
    assert any(k.endswith("router.expert_bias") for k in before)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(before[k], later[k]) for k in before)  # step 4 did train


def test_next_step_queued_early_trains_exactly_like_step_by_step(tmp_path):
    """Trainer.step queues the next step's forward and backward before reading its own numbers
    except before a checkpoint (train/loop.py): a checkpoint every step turns that off. With a
    skipped NaN step and aux-loss-free expert biases in between, both must train identically."""
    common = ("training.max_steps=6", "checkpoint.keep_last=0", "training.on_nonfinite=skip",
              "moe.router.expert_bias=true")
    step_by_step, early = tmp_path / "step_by_step", tmp_path / "early"
    train(step_by_step, *common, "checkpoint.interval=1", fault="nan@grads:3")
    train(early, *common, "checkpoint.interval=6", fault="nan@grads:3")
    same_rows(early, step_by_step)
    got, want = (read_metrics(run / "metrics.jsonl") for run in (early, step_by_step))
    assert [r.get("skipped") for r in got] == [r.get("skipped") for r in want]
    assert got[2]["skipped"] == 1.0
    assert [r["moe/layer_01/load_cv"] for r in got] == [r["moe/layer_01/load_cv"] for r in want]
    final = [_tensors(checkpoints(run)[6], tmp_path / run.name) for run in (early, step_by_step)]
    assert final[0].keys() == final[1].keys()
    assert any(k.endswith("router.expert_bias") for k in final[0])
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_nonfinite_gradient_stops_at_the_last_good_state_and_resumes_exactly(tmp_path,
                                                                            straight_run):
    run = tmp_path / "run"
    result = train(run, fault="nan@grads:5", expect=3)
    assert "moe-lab: stopped: grad_norm is nan at step 5" in result.stderr
    assert list(checkpoints(run)) == [2, 4]  # the state after step 4 is the newest
    train(run)
    same_rows(run, straight_run)


def test_nonfinite_loss_stops_with_a_checkpoint_of_the_last_good_state(tmp_path):
    # lr 1e30 (after one warm-up step at lr 0) blows the weights up: step 3's loss is NaN.
    run = tmp_path / "run"
    result = train(run, "optimizer.lr=1e30", "optimizer.min_lr=0", "optimizer.warmup_steps=1",
                   "checkpoint.interval=0", expect=3)
    assert "moe-lab: stopped: loss is nan at step 3" in result.stderr
    assert list(checkpoints(run)) == [2]
    verify(run / "checkpoints" / "step_0000002")


def test_fault_specs_parse_or_name_the_problem():
    assert Fault.parse("kill@save_written:2") == Fault("kill", "save_written", 2)
    assert Fault.parse("kill@grads:3") == Fault("kill", "grads", 3)
    for bad in ("kill@nowhere:1", "kill@step_end", "nan@step_end:1", "kill@step_end:0"):
        with pytest.raises(ValueError, match="fault"):
            Fault.parse(bad)


def test_latest_checkpoint_is_the_newest_whole_one(run_copy, tmp_path):
    assert latest_checkpoint(run_copy).name == "step_0000012"
    (run_copy / "checkpoints" / "step_0000012" / MANIFEST).unlink()
    assert latest_checkpoint(run_copy).name == "step_0000010"
    assert latest_checkpoint(tmp_path / "nothing here") is None


def test_weights_move_between_backends_whatever_extra_state_each_keeps(tmp_path):
    """megatron's local linears keep a module `_extra_state` (None; Transformer Engine's keep their
    FP8 scaling state there), the torch backend's grouped experts keep none: a checkpoint of the
    torch backend initialises the local backend (it failed with "Missing key in checkpoint
    state_dict: ...experts.linear_fc1._extra_state"), and both compute the same first loss."""
    base = tmp_path / "base"
    common = ["training.log_interval=1", "optimizer.warmup_steps=0", "tracking.enabled=false"]
    result = run_cli(["train", TINY_MOE, "--run-dir", str(base), "model.backend=torch",
                      "training.max_steps=2", *common])
    assert result.returncode == 0, result.stderr[-2000:]
    first_loss = {}
    for backend in ("torch", "local"):
        run = tmp_path / backend
        result = run_cli(["train", TINY_MOE, "--run-dir", str(run), f"model.backend={backend}",
                          f"checkpoint.init_from={base}", "training.max_steps=1", *common])
        assert result.returncode == 0, result.stderr[-2000:]
        first_loss[backend] = read_metrics(run / "metrics.jsonl")[0]["loss/lm"]
    assert first_loss["local"] == pytest.approx(first_loss["torch"], rel=1e-4)
    assert first_loss["local"] < read_metrics(base / "metrics.jsonl")[0]["loss/lm"]  # trained


def test_every_expert_gemms_extra_state_of_te_grouped_linears_is_optional(world, tmp_path):
    """Transformer Engine's grouped expert linear keeps one extra state per expert GEMM, under the
    state-dict keys `_extra_state`, `_extra_state1`, ... (all one checkpoint key, sharded over the
    expert axis). A checkpoint that lacks them starts them fresh, all of them (the te backend
    failed to initialise from a local-backend checkpoint on the GPU when only `_extra_state` was
    optional); extra state the checkpoint holds is loaded."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from moe_lab.train.checkpoint import EXTRA_STATE, FRESH_IF_ABSENT, _fresh_if_absent

    def extra_state(key, expert):  # as TE's grouped linear shards it: one object per expert
        return ShardedObject(key, None, (2,), (expert,), replica_id=0)

    weight = ShardedTensor.from_rank_offsets("fc1.weight", torch.ones(2, 2), replica_id=0)
    saved = {"fc1.weight": weight, "fc2._extra_state": ShardedObject(
        "fc2._extra_state", None, (1,), (0,), replica_id=0)}
    dist_checkpointing.save(saved, str(tmp_path))
    model_state = {**saved, "fc1._extra_state": extra_state("fc1._extra_state", 0),
                   "fc1._extra_state1": extra_state("fc1._extra_state", 1),
                   "mlp.router.expert_bias": ShardedTensor.from_rank_offsets(
                       "mlp.router.expert_bias", torch.zeros(2), replica_id=0)}
    assert _fresh_if_absent(model_state, tmp_path, EXTRA_STATE) == {
        "fc1._extra_state", "fc1._extra_state1"}
    assert _fresh_if_absent(model_state, tmp_path, f"{EXTRA_STATE}|{FRESH_IF_ABSENT}") == {
        "fc1._extra_state", "fc1._extra_state1", "mlp.router.expert_bias"}
