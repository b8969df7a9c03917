"""The non-finite guard: a NaN/Inf loss or gradient norm never reaches the weights.

Checked after the backward pass and before the optimizer update, with the same answer on every
rank. On the fused update path (train/optim.py) the update is queued first and skips itself on
the GPU when the loss or the gradient norm is not finite (train/step.py); the host then acts on
the same two numbers here. training.on_nonfinite chooses what follows: `skip` drops the update
(weights, optimizer and LR schedule stay as they were; the step still counts and its data is not
repeated), `stop` raises NonFiniteError, and the loop saves the last good state before stopping.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/Inf; the message says what and where."""


def nonfinite_value(loss: float, optimizer,
                    grad_norm: float | None = None) -> tuple[str, float] | None:
    """("loss" | "grad_norm", value) when one is NaN/Inf, else None. Collective: every rank.
    `grad_norm`: the global gradient norm when the caller already computed it (after
    prepare_grads, as train/optim.prepare_and_norm does)."""
    # NCCL reduces CUDA tensors only; gloo (the CPU path) CPU tensors.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # the loss is reduced over ranks; make sure
    if bad.item():
        return "loss", loss
    # megatron's own sequence (MegatronOptimizer.step does the same first): gradients into
    # the main params, then their global norm. The update recomputes both, identically.
    if grad_norm is None:
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
    return None if math.isfinite(grad_norm) else ("grad_norm", grad_norm)


def first_nonfinite(loss: float, grad_norm: float) -> tuple[str, float] | None:
    """("loss" | "grad_norm", value) for the first of the two that is NaN/Inf, else None; both
    already reduced over all ranks."""
    if not math.isfinite(loss):
        return "loss", loss
    return None if math.isfinite(grad_norm) else ("grad_norm", grad_norm)


def check_before_update(cfg, step: int, metrics: dict, optimizer,
                        grad_norm: float | None = None) -> dict | None:
    """None when the update may go ahead. Otherwise, by training.on_nonfinite: raise
    NonFiniteError (stop), or return the skipped step's metrics (skip)."""
    return act_on_nonfinite(cfg, step, metrics, optimizer,
                            nonfinite_value(metrics["loss"], optimizer, grad_norm))


def act_on_nonfinite(cfg, step: int, metrics: dict, optimizer,
                     bad: tuple[str, float] | None) -> dict | None:
    """What `check_before_update` does with a found NaN/Inf (`bad`; None: nothing found)."""
    if bad is None:
        return None
    name, value = bad
    where = f"{name} is {value} at step {step + 1}"
    if cfg.training.on_nonfinite == "stop":
        raise NonFiniteError(where)
    if dist.get_rank() == 0:
        print(f"warning: {where}; update skipped (training.on_nonfinite=skip)", flush=True)
    return {**metrics, "grad_norm": value if name == "grad_norm" else float("nan"),
            "lr": optimizer.param_groups[0]["lr"], "skipped": 1.0}
