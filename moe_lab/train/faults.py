"""Test-only fault injection: kill the process, or poison a gradient, at a named point.

A fault is `ACTION@POINT:N`: the N-th time this process reaches POINT (counted from 1), do
ACTION. Actions: `kill` (SIGKILL, as a node failure would: no clean-up runs) and `nan` (at the
`grads` point only: one gradient element becomes NaN). Points: step_begin, grads (inside a step:
after megatron's gradient reduction, before the optimizer update), step_end (after the update,
before the step is counted and saved), and save_begin, save_written, save_manifest, save_renamed,
save_latest (the stages of a checkpoint save).
launch/ reads the spec from MOE_LAB_TEST_FAULT and passes it down; nothing else sets it.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from dataclasses import dataclass

from moe_lab.train.grad_accumulation import main_grads_changed

POINTS = ("step_begin", "step_end", "grads", "save_begin", "save_written", "save_manifest",
          "save_renamed", "save_latest")
ACTIONS = ("kill", "nan")


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    count: int

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        """`kill@save_written:2` -> Fault("kill", "save_written", 2); ValueError if malformed."""
        try:
            action, rest = spec.split("@")
            point, count = rest.split(":")
            fault = cls(action, point, int(count))
        except ValueError:
            raise ValueError(f"fault {spec!r} is not ACTION@POINT:N") from None
        if action not in ACTIONS or point not in POINTS or fault.count < 1:
            raise ValueError(f"fault {spec!r}: action one of {ACTIONS}, point one of {POINTS}, "
                             f"N >= 1")
        if action == "nan" and point != "grads":
            raise ValueError(f"fault {spec!r}: `nan` goes with the `grads` point only")
        return fault


class FaultInjector:
    """Counts points; fires the fault (if any) when its point is reached the N-th time."""

    def __init__(self, fault: Fault | None, model_config=None):
        self.fault = fault
        self.seen: Counter = Counter()
        if fault is not None and fault.point == "grads" and model_config is not None:
            self._hook_after_grad_reduction(model_config)

    def at(self, point: str) -> bool:
        self.seen[point] += 1
        f = self.fault
        hit = f is not None and f.point == point and self.seen[point] == f.count
        if hit and f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return hit

    def _hook_after_grad_reduction(self, model_config) -> None:
        """Wrap megatron's finalize_model_grads hook (the pipeline schedules call the one in the
        model config after the backward pass) to reach the `grads` point there; `nan` leaves a
        NaN gradient."""
        finalize = model_config.finalize_model_grads_func

        def finalize_then_poison(model_chunks, *args, **kwargs):
            result = finalize(model_chunks, *args, **kwargs)
            if self.at("grads") and self.fault.action == "nan":
                param = next(p for p in model_chunks[0].parameters() if p.requires_grad)
                grad = getattr(param, "main_grad", param.grad)
                grad.view(-1)[0] = float("nan")
                main_grads_changed(model_chunks[0])  # the hooks' squares do not see it
            return result

        model_config.finalize_model_grads_func = finalize_then_poison
