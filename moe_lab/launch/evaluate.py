"""`moe-lab eval`: validation loss and perplexity of a checkpoint, before and around the
evaluation itself (finding the run's config and checkpoint, checks, process groups).

A single process evaluates in a single-process layout (dist_checkpointing reshards the weights
from whatever layout trained them); under torchrun or srun the config's layout is used.
"""

from __future__ import annotations

from pathlib import Path

from moe_lab import config as config_lib
from moe_lab.config import ExperimentConfig
from moe_lab.data import check_data
from moe_lab.launch.cli import UserError
from moe_lab.launch.distributed import check_layout, detect_env, init_distributed, shutdown_distributed
from moe_lab.launch.run import _use_gpu

_SINGLE_PROCESS = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.etp=1",
                   "parallel.cp=1"]


def run_eval(target: str, data: list[str] | None, overrides: list[str]) -> list[dict]:
    """One result per evaluated dataset, {data, checkpoint, loss, perplexity, samples, tokens},
    on global rank 0 (an empty list on the other ranks)."""
    run_dir, checkpoint = _locate(Path(target))
    env = detect_env()
    layout = _SINGLE_PROCESS if env.world_size == 1 else []
    cfg = config_lib.load(run_dir / "config.yaml", [*layout, *overrides])
    blends = [[[1.0, prefix]] for prefix in data] if data else [None]
    check_layout(cfg, env.world_size)
    for blend in blends:
        check_data(cfg, env.world_size, evaluating=True, blend=blend)
    use_gpu = _use_gpu(cfg)
    if not use_gpu:
        from moe_lab.compat import enable_cpu_compat

        enable_cpu_compat()
    init_distributed(cfg, env, use_gpu)
    try:
        from moe_lab.train.evaluate import evaluate_checkpoint, perplexity

        losses = evaluate_checkpoint(cfg, checkpoint, use_gpu, blends, run_dir / "data_cache")
    finally:
        shutdown_distributed()
    if env.rank != 0:
        return []
    return [{"data": _describe(cfg, blend), "checkpoint": str(checkpoint), "loss": loss,
             "perplexity": perplexity(loss), "samples": cfg.data.valid_samples,
             "tokens": cfg.data.valid_samples * cfg.training.seq_length}
            for blend, loss in zip(blends, losses)]


def _locate(target: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory or one of its checkpoints."""
    from moe_lab.train.checkpoint import latest_checkpoint

    if (target / "config.yaml").is_file():
        checkpoint = latest_checkpoint(target)
        if checkpoint is None:
            raise UserError(f"{target}: the run has no checkpoint yet")
        return target, checkpoint
    run_dir = target.parent.parent  # RUN_DIR/checkpoints/step_NNNNNNN
    if target.is_dir() and (run_dir / "config.yaml").is_file():
        return run_dir, target
    raise UserError(f"{target}: not a run directory (config.yaml) nor a checkpoint inside one")


def _describe(cfg: ExperimentConfig, blend: list | None) -> str:
    blend = blend or cfg.data.valid_blend or cfg.data.blend
    if not blend:
        return "synthetic"
    return " + ".join(f"{w:g}*{p}" for w, p in blend) if len(blend) > 1 else blend[0][1]
