"""Progress lines for long work, and the quiet switch that turns them off.

Training prints one line per `training.log_interval` (tracking/sinks.py ConsoleSink); data
preparation draws a tqdm bar on a terminal; a local sweep prints, every `interval` seconds, one
line per running member read from its RUN_DIR/metrics.jsonl, plus the sweep's own ETA. Lines, not
redrawn bars, so that they stay readable in Slurm logs; `moe-lab --quiet` (MOE_LAB_QUIET=1, which
the processes a sweep starts inherit) keeps only results, warnings and errors.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from moe_lab.tracking.sinks import format_duration as duration


def quiet() -> bool:
    return os.environ.get("MOE_LAB_QUIET") == "1"


def last_rows(metrics_file: Path) -> tuple[dict | None, dict | None]:
    """The last train row and the last validation row of a metrics.jsonl (None while absent)."""
    train = valid = None
    try:
        lines = metrics_file.read_text().splitlines()
    except FileNotFoundError:
        return None, None
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line the trainer is writing right now
        if row.get("split") == "valid":
            valid = row
        else:
            train = row
    return train, valid


class SweepProgress:
    """Periodic lines for a local sweep: each running member's step, loss, tokens/s and ETA,
    then the sweep's ETA, estimated from the members that finished in this call (or, before
    any has, from the running members' own estimates of their total time)."""

    def __init__(self, total: int, max_parallel: int, interval: float = 15.0):
        self.total, self.max_parallel, self.interval = total, max_parallel, interval
        self.member_seconds: list[float] = []
        self._next = time.monotonic() + interval

    def finished(self, seconds: float) -> None:
        self.member_seconds.append(seconds)

    def maybe_print(self, running: list[tuple[str, Path, int, float]], waiting: int) -> None:
        """running: (label, run dir, max_steps, seconds since start) for each active member."""
        now = time.monotonic()
        if quiet() or now < self._next or not running:
            return
        self._next = now + self.interval
        remaining_active, starting = [], []
        for label, run_dir, max_steps, elapsed in running:
            train, valid = last_rows(run_dir / "metrics.jsonl")
            if train is None:
                starting.append(elapsed)
                print(f"  [{label}] starting ({duration(elapsed)} so far)", flush=True)
                continue
            parts = [f"step {train['step']}/{max_steps}"]
            if "loss" in train:
                parts.append(f"loss {train['loss']:.4g}")
            if valid is not None:
                parts.append(f"valid/loss {valid['valid/loss']:.4g}")
            if "throughput/tokens_per_s" in train:
                parts.append(f"tokens/s {train['throughput/tokens_per_s']:,.0f}")
            if "eta_s" in train:
                parts.append(f"eta {duration(train['eta_s'])}")
                remaining_active.append((elapsed, train["eta_s"]))
            print(f"  [{label}] " + " | ".join(parts), flush=True)
        eta = self._sweep_eta(remaining_active, starting, waiting)
        done = len(self.member_seconds)
        print(f"  sweep: {done}/{self.total} finished in this call"
              + (f", eta {duration(eta)}" if eta is not None else ""), flush=True)

    def _sweep_eta(self, active: list[tuple[float, float]], starting: list[float],
                   waiting: int) -> float | None:
        """active: (elapsed, remaining) of members that logged; starting: elapsed of those that
        have not logged yet."""
        if not active and not self.member_seconds:
            return None
        per_member = (sum(self.member_seconds) / len(self.member_seconds) if self.member_seconds
                      else sum(e + r for e, r in active) / len(active))
        remaining = [r for _, r in active] + [max(0.0, per_member - e) for e in starting]
        # Waiting members start as slots free up, max_parallel at a time.
        rounds = -(-waiting // self.max_parallel)
        return max(remaining, default=0.0) + rounds * per_member
