"""Checkpoints with megatron dist_checkpointing: RUN_DIR/checkpoints/step_NNNNNNN/ + `latest`.

A save writes `step_NNNNNNN.tmp/` (each rank its own tensors; optionally asynchronously), then rank
0 writes the manifest into it, renames it to its final name and only then moves the `latest`
marker and applies retention. A crash at any point leaves either a `.tmp` directory, which is
never loaded, or a complete checkpoint. Resuming takes the newest checkpoint whose manifest
verifies (manifest.py); a damaged one is skipped with a warning naming what is wrong.

Contents: the model's sharded state (no DDP `module.` prefix), the optimizer state in parameter
space (optimizer_state.py: loadable in any parallel layout), and as common state the scheduler
and {step, consumed_samples}. RNG states are in the manifest.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from moe_lab.config import ExperimentConfig
from moe_lab.train import manifest as manifest_lib
from moe_lab.train.manifest import CheckpointInvalid
from moe_lab.train.optimizer_state import FORMAT as OPTIMIZER_FORMAT
from moe_lab.train.optimizer_state import OptimizerState
from moe_lab.train.resume import (  # noqa: F401 (latest_checkpoint: for readers outside train)
    PREFIX,
    checkpoint_dir,
    checkpoints,
    latest_checkpoint,
)
from moe_lab.train.retention import stale_steps


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


def save_checkpoint(run_dir: Path, state: TrainState, model, optimizer, scheduler,
                    keep_last: int = 0) -> Path:
    """One synchronous save outside the training loop (optimizer may be None: weights only),
    in the same layout with a manifest; returns the checkpoint directory."""
    saver = Checkpointer(None, run_dir, model, optimizer, scheduler)
    saver.keep_last = keep_last
    saver.save(state)
    return checkpoint_dir(run_dir) / f"{PREFIX}{state.step:07d}"


def _unwrap(model):
    """The GPTModel inside megatron's DDP wrapper: checkpoint keys carry no `module.` prefix."""
    return getattr(model, "module", model)


# Model state that a weights-only source (checkpoint.init_from) may lack: the router's expert
# bias is balancing state that starts at zero, not a learned weight, and a dense model upcycled
# or a run trained without it has none.
FRESH_IF_ABSENT = r"\.router\.expert_bias$"
# Module extra state that any checkpoint may lack: Transformer Engine's FP8 scaling state, None
# in megatron's own linears, absent from modules that keep none (the torch backend's experts,
# SDPA). A checkpoint written by another backend holds other such objects than the loading model
# asks for; those it lacks start fresh, as in a new run. TE's grouped expert linear keeps one
# per expert GEMM: `_extra_state`, `_extra_state1`, `_extra_state2`, ...
EXTRA_STATE = r"\._extra_state\d*$"


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> TrainState:
    """Load the model, and the optimizer, scheduler, step and RNG when given an optimizer."""
    model_state = _unwrap(model).sharded_state_dict()
    optional = EXTRA_STATE if optimizer is not None else f"{EXTRA_STATE}|{FRESH_IF_ABSENT}"
    fresh = _fresh_if_absent(model_state, path, optional)
    model_state = {k: v for k, v in model_state.items() if k not in fresh}
    sharded = {"model": model_state}
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = OptimizerState(optimizer)
        sharded["optimizer"] = optimizer_state.sharded_state(model_state, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path))
    missing = _unwrap(model).load_state_dict(loaded["model"], strict=not fresh).missing_keys
    if set(missing) - fresh:
        raise CheckpointInvalid(f"{path}: has no {sorted(set(missing) - fresh)[0]}")
    if optimizer is None:
        return TrainState()
    optimizer_state.load(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    manifest_lib.restore_rng(manifest_lib.read(path)["rng"])
    return TrainState(**loaded["train_state"])


def _fresh_if_absent(model_state: dict, path: Path, pattern: str) -> set[str]:
    """State-dict keys matching `pattern` whose tensor or object the checkpoint at `path` does
    not hold."""
    candidates = {k for k in model_state if re.search(pattern, k)}
    if not candidates:
        return set()
    stored = {item.key for item in load_sharded_metadata(str(path)).values()}
    return {k for k in candidates if getattr(model_state[k], "key", k) not in stored}


class Checkpointer:
    """Saves checkpoints of one run: layout on disk, async writes, manifest, retention.

    `on_event(name)` is called at each stage of a save (save_begin, save_written,
    save_manifest, save_renamed, save_latest): the fault-injection tests kill the process there.
    """

    def __init__(self, cfg: ExperimentConfig | None, run_dir: Path, model, optimizer, scheduler,
                 on_event: Callable[[str], None] = lambda name: None):
        self.cfg, self.root = cfg, checkpoint_dir(run_dir)
        self.run_dir = Path(run_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.on_event = on_event
        c = cfg.checkpoint if cfg is not None else None
        self.keep_last, self.keep_every = (c.keep_last, c.keep_every) if c else (0, 0)
        self.queue = AsyncCallsQueue() if c and c.async_save else None

    def save(self, state: TrainState) -> None:
        """Write a checkpoint of `state` (asynchronously with checkpoint.async_save)."""
        self.wait()  # one save in flight at a time
        name = f"{PREFIX}{state.step:07d}"
        tmp = self.root / f"{name}.tmp"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.on_event("save_begin")
        manifest = manifest_lib.build(
            self.cfg, step=state.step, consumed_samples=state.consumed_samples,
            layout=_layout(), optimizer_format=OPTIMIZER_FORMAT if self.optimizer else None,
            mlflow_run_id=_mlflow_run_id(self.run_dir))
        request = dist_checkpointing.save(
            self._sharded_state(state), str(tmp), async_sharded_save=self.queue is not None,
            async_strategy="mcore")
        finish = lambda: self._finish(tmp, name, state.step, manifest)  # noqa: E731
        if request is None:
            finish()
        else:
            request.add_finalize_fn(finish)
            self.queue.schedule_async_request(request)

    def save_last_good(self, state: TrainState) -> None:
        """Before stopping on a NaN/Inf: a whole checkpoint of `state` (unless there is one)."""
        self.wait()
        box = [dist.get_rank() == 0 and _is_whole(checkpoints(self.run_dir).get(state.step),
                                                  self.cfg)]
        dist.broadcast_object_list(box, src=0)
        if not box[0]:
            self.save(state)
        self.close()

    def poll(self) -> None:
        """Finish an asynchronous save whose files are written (collective: every rank)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Finish any asynchronous save, waiting for its files."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    def _sharded_state(self, state: TrainState) -> dict:
        model_state = _unwrap(self.model).sharded_state_dict()
        sharded = {
            "model": model_state,
            "scheduler": self.scheduler.state_dict(),
            "train_state": {"step": state.step, "consumed_samples": state.consumed_samples},
        }
        if self.optimizer is not None:
            sharded["optimizer"] = OptimizerState(self.optimizer).sharded_state(
                model_state, is_loading=False)
        return sharded

    def _finish(self, tmp: Path, name: str, step: int, manifest: dict) -> None:
        """After every rank's files are written: manifest, rename, `latest`, retention."""
        self.on_event("save_written")
        final = self.root / name
        if dist.get_rank() == 0:
            manifest_lib.write(tmp, manifest)
            self.on_event("save_manifest")
            _replace_dir(tmp, final)
            self.on_event("save_renamed")
            _write_atomically(self.root / "latest", name)
            self.on_event("save_latest")
            self._apply_retention(step)
        dist.barrier()

    def _apply_retention(self, step: int) -> None:
        found = checkpoints(self.run_dir)
        for old in stale_steps(list(found), step, self.keep_last, self.keep_every):
            shutil.rmtree(found[old])
        # Leftovers of saves that were killed: never loadable, only taking space.
        for leftover in self.root.glob(f"{PREFIX}*.*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


def _is_whole(path: Path | None, cfg: ExperimentConfig) -> bool:
    try:
        return path is not None and bool(manifest_lib.verify(path, cfg))
    except CheckpointInvalid:
        return False


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final. A checkpoint of the same step (re-reached after a restart) is moved
    aside first and deleted after, so a crash in between still leaves a whole one."""
    old = final.with_name(final.name + ".replaced")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _layout() -> dict:
    ps = parallel_state
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "world_size": dist.get_world_size()}


def _mlflow_run_id(run_dir: Path) -> str | None:
    path = Path(run_dir) / "mlflow_run_id"
    return (path.read_text().strip() or None) if path.is_file() else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
