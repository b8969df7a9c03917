"""Checkpoints with megatron dist_checkpointing: RUN_DIR/checkpoints/step_NNNNNNN/ + `latest`.

A checkpoint is written under a temporary name and renamed when every rank has finished, and the
`latest` marker moves only after the rename, so a crash mid-save never leaves a half-written
checkpoint under a final name. Sharded tensors (model, optimizer) are saved by the ranks that own
them; the scheduler, step and RNG state are common state written once.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

# fully_reshardable is the DistributedOptimizer format that loads on the non-TE path here.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    marker = checkpoint_dir(run_dir) / "latest"
    if not marker.is_file():
        return None
    path = checkpoint_dir(run_dir) / marker.read_text().strip()
    return path if path.is_dir() else None


def _unwrap(model):
    """The GPTModel inside megatron's DDP wrapper: checkpoint keys carry no `module.` prefix."""
    return getattr(model, "module", model)


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    model_state = _unwrap(model).sharded_state_dict()
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=_OPTIMIZER_FORMAT)
    return state


def save_checkpoint(run_dir: Path, state: TrainState, model, optimizer, scheduler,
                    keep_last: int = 0) -> Path:
    root = checkpoint_dir(run_dir)
    name = f"step_{state.step:07d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sharded = _sharded_state(model, optimizer, is_loading=False)
    sharded.update(
        scheduler=scheduler.state_dict(),
        train_state={"step": state.step, "consumed_samples": state.consumed_samples},
        rng={"torch": torch.get_rng_state()},
    )
    dist_checkpointing.save(sharded, str(tmp), content_metadata=_OPTIMIZER_FORMAT)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # re-saving the same step after a restart
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(root / "latest", name)
        _apply_retention(root, keep_last)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> TrainState:
    """Load model (and optimizer and scheduler, when given) state saved by save_checkpoint."""
    if optimizer is not None:
        _materialise_optimizer_state(optimizer)
    sharded = _sharded_state(model, optimizer, is_loading=True)
    if scheduler is not None:
        sharded.update(scheduler=scheduler.state_dict(), train_state={}, rng={})
    loaded = dist_checkpointing.load(sharded, str(path))
    _unwrap(model).load_state_dict(loaded["model"])
    if optimizer is None:
        return TrainState()
    _load_optimizer_state(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    torch.set_rng_state(loaded["rng"]["torch"])
    return TrainState(**loaded["train_state"])


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no per-parameter state until its first step, but building the
    load template (DistributedOptimizer.state_dict) reads every parameter's `step` and the
    fully_reshardable loader copies into existing exp_avg/exp_avg_sq. megatron's init hook
    creates the moments without touching the parameters; `step` we add (the checkpoint's
    value replaces it)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "init_state_fn", None) is None:
            continue
        opt.init_state_fn(opt.optimizer, opt.config)
        for state in opt.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


def _load_optimizer_state(optimizer, state: dict) -> None:
    """optimizer.load_state_dict, in two phases for each DistributedOptimizer.

    On megatron-core 0.19.2 without apex/TE, DistributedOptimizer.load_state_dict first puts
    Adam's tensor `step` into every parameter's state and then expects a `step` entry in the
    fully_reshardable parameter state, which never holds one (KeyError 'step'). Loading the
    parameter state ourselves, with `step` set aside, uses the same public methods in the same
    order. Without this, resuming raised KeyError 'step', and with a shared step tensor the
    first resumed update differed from an uninterrupted run.
    """
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(subs) == 1 else [v for _, v in sorted(state.items())]
    for opt, sub_state in zip(subs, states):
        param_state = None
        if isinstance(opt, DistributedOptimizer) and "param_state" in sub_state:
            param_state = sub_state.pop("param_state")
            kind = sub_state.pop("param_state_sharding_type")
            assert kind == "fully_reshardable", kind
        opt.load_state_dict(sub_state)
        if param_state is not None:
            steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
            opt.load_parameter_state_from_fully_reshardable(param_state)
            for param, step in steps.items():
                # load_state_dict gave every parameter the same step tensor, and torch's Adam
                # increments it in place once per parameter: each needs its own.
                opt.optimizer.state[param]["step"] = step.clone()


def _apply_retention(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep_last]:
        shutil.rmtree(old)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
