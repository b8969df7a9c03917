"""Which checkpoint a run resumes from: the newest one that verifies against its manifest.

Final checkpoint directories are `RUN_DIR/checkpoints/step_NNNNNNN/`; anything else there (the
`.tmp` directory of an unfinished save, the `latest` marker) is never a candidate. A candidate
that fails verification (manifest.py) is skipped with its reason; when checkpoints exist and none
verifies, resuming is refused rather than silently starting again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from moe_lab.config import ExperimentConfig
from moe_lab.train import manifest as manifest_lib
from moe_lab.train.manifest import CheckpointInvalid

PREFIX = "step_"


class NoUsableCheckpoint(CheckpointInvalid):
    """Checkpoints exist but none may be loaded."""


@dataclass
class Resume:
    """The checkpoint a run resumes from (None: start fresh) and those skipped, newest first."""

    path: Path | None = None
    step: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int | None:
    """The step of a final checkpoint directory name; None for anything else (.tmp, markers)."""
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def checkpoints(run_dir: Path) -> dict[int, Path]:
    root = checkpoint_dir(run_dir)
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return dict(sorted((s, p) for s, p in found if s is not None))


def find_resumable(run_dir: Path, cfg: ExperimentConfig | None) -> Resume:
    """The newest checkpoint that verifies. Raises NoUsableCheckpoint when there are
    checkpoints and none verifies (rather than silently starting again)."""
    skipped = []
    for step, path in sorted(checkpoints(run_dir).items(), reverse=True):
        try:
            manifest_lib.verify(path, cfg)
        except CheckpointInvalid as err:
            skipped.append((path, str(err)))
            continue
        return Resume(path, step, skipped)
    if skipped:
        reasons = "; ".join(reason for _, reason in skipped)
        raise NoUsableCheckpoint(
            f"no checkpoint in {checkpoint_dir(run_dir)} can be resumed: {reasons}. Move them "
            f"away to start again, or choose another --run-dir")
    return Resume()


def weights_source(path: Path) -> Path:
    """checkpoint.init_from: a checkpoint directory (verified when it has a manifest; one
    without, e.g. converted from Hugging Face, is read as is) or a run directory (its newest
    whole checkpoint)."""
    path = Path(path)
    if (path / manifest_lib.MANIFEST).is_file():
        manifest_lib.verify(path)
        return path
    if (path / "metadata.json").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        find_resumable(path, None)  # raises, with the reasons, when checkpoints exist but fail
        raise FileNotFoundError(f"checkpoint.init_from: no checkpoint in {path}")
    return found


def preflight(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Before any process starts: the checks loading will make, so that a run that cannot
    resume (or initialise) stops with one line. Raises CheckpointInvalid or FileNotFoundError."""
    resume = find_resumable(run_dir, cfg)
    if resume.path is None and cfg.checkpoint.init_from:
        manifest_lib.check_weights_fit(weights_source(Path(cfg.checkpoint.init_from)), cfg)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint of a run directory (verified against its manifest, model
    not checked), or None. For readers outside `train` (eval, convert, upcycle). Checkpoints
    written without a manifest (Hugging Face imports) are read as they are, as
    checkpoint.init_from reads them; a checkpoint whose manifest fails never is."""
    try:
        path = find_resumable(run_dir, None).path
    except NoUsableCheckpoint:
        path = None
    if path is None:
        plain = [p for p in checkpoints(run_dir).values()
                 if not (p / manifest_lib.MANIFEST).exists() and (p / "metadata.json").is_file()]
        path = plain[-1] if plain else None
    return path


def broadcast_resume(run_dir: Path, cfg: ExperimentConfig) -> Resume:
    """find_resumable on rank 0, the same answer (or error) on every rank: verifying reads and
    hashes files, which one rank does for all."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = find_resumable(run_dir, cfg)
        except NoUsableCheckpoint as err:
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]
