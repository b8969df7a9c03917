"""Kill -9 at seeded points inside steps and inside saves: every restart resumes from a whole
checkpoint, and the run ends exactly as an uninterrupted one (fp32, same data order).

The fault hook (MOE_LAB_TEST_FAULT, train/faults.py) kills the process the N-th time it reaches
a point. Points and N are drawn from a seeded generator, within what the resumed run still has
to do, so every run is really killed; kills inside saves use asynchronous saves half the time.
Run: pytest tests/train/test_faults.py
"""

from __future__ import annotations

import random
import signal

from moe_lab import config as config_lib
from moe_lab.train.resume import find_resumable
from moe_lab.train.manifest import verify

from .conftest import STEPS, same_rows, train

SEED = 0
KILLS = 10
KILL_POINTS = ("step_begin", "grads", "step_end", "save_begin", "save_written", "save_manifest",
               "save_renamed", "save_latest")
STEP_POINTS = ("step_begin", "grads", "step_end")  # the N-th step of the run


def plan(rng: random.Random) -> list[str]:
    """Every kill point once, in a seeded order, then seeded extra ones."""
    points = list(KILL_POINTS)
    rng.shuffle(points)
    return points + [rng.choice(KILL_POINTS) for _ in range(KILLS - len(points))]


def draw(rng: random.Random, point: str, resumed_at: int) -> tuple[str, int, bool]:
    """N for `point` such that the run from `resumed_at` gets there before its final save (so
    the run must have steps left for the next kill); a step point when no save is left."""
    remaining = STEPS - resumed_at
    saves_before_last = (remaining - 1) // 2  # checkpoints every 2 steps
    if point not in STEP_POINTS and saves_before_last == 0:
        point = rng.choice(STEP_POINTS)
    limit = remaining if point in STEP_POINTS else saves_before_last
    n = rng.randint(1, min(limit, 2 if point.startswith("save") else 4))
    # Asynchronous saves where the kill is inside a save; a kill inside a step while a write
    # is in flight would make the resume point depend on timing, and the plan with it.
    return point, n, point.startswith("save") and rng.random() < 0.5


def resume_after_kill(point: str, n: int, resumed_at: int) -> int:
    """Where the next run must resume: the last save whose directory got its final name."""
    if point in STEP_POINTS:
        saves_done = (n - 1) // 2  # a step_end kill comes before that step's save
    else:
        saves_done = n if point in ("save_renamed", "save_latest") else n - 1
    return resumed_at + 2 * saves_done


def test_kill_9_at_seeded_points_then_resume_equals_the_straight_run(tmp_path, straight_run):
    rng, run, resumed_at, log = random.Random(SEED), tmp_path / "run", 0, []
    for planned in plan(rng):
        point, n, use_async = draw(rng, planned, resumed_at)
        log.append((resumed_at, point, n, use_async))
        result = train(run, f"checkpoint.async_save={str(use_async).lower()}",
                       fault=f"kill@{point}:{n}", expect=-signal.SIGKILL)
        _check_resumed_from(result.stdout, run, resumed_at, log)
        cfg = config_lib.load(str(run / "config.yaml"))
        intact = find_resumable(run, cfg)
        assert intact.step == resume_after_kill(point, n, resumed_at), log
        if intact.path is not None:
            verify(intact.path, cfg)
        resumed_at = intact.step
    assert len(log) == KILLS and {kind for _, kind, _, _ in log} == set(KILL_POINTS), log
    result = train(run)
    _check_resumed_from(result.stdout, run, resumed_at, log)
    same_rows(run, straight_run)


def _check_resumed_from(stdout: str, run, step: int, log) -> None:
    if step == 0:
        assert "resumed from" not in stdout, log
    else:
        ckpt = run / "checkpoints" / f"step_{step:07d}"
        assert f"resumed from {ckpt} at step {step}\n" in stdout, log
