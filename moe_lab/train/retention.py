"""Which checkpoints retention deletes: keep the last N, and every M-th step for good."""

from __future__ import annotations


def stale_steps(steps: list[int], current: int, keep_last: int, keep_every: int) -> list[int]:
    """Steps to delete after saving `current`.

    keep_last 0 keeps everything. A step that is a multiple of keep_every (> 0) is kept for
    good. Checkpoints newer than `current` are left alone: they are what a resume skipped as
    damaged (kept for inspection) and are replaced when training reaches their step again.
    """
    if keep_last <= 0:
        return []
    older = sorted(s for s in steps if s <= current)
    kept = set(older[-keep_last:]) | {current}
    if keep_every > 0:
        kept |= {s for s in older if s % keep_every == 0}
    return [s for s in older if s not in kept]
