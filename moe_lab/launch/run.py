"""`moe-lab train`: everything that happens before and after the training loop.

Order matters: the config and the layout are checked before any process group starts, and the
run directory is checked before anything is written into it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from moe_lab import config as config_lib
from moe_lab.config import ConfigError, ExperimentConfig
from moe_lab.data import check_data
from moe_lab.launch import preemption
from moe_lab.launch.cli import UserError
from moe_lab.launch.distributed import check_layout, detect_env, init_distributed, shutdown_distributed
from moe_lab.launch.upcycle import upcycle_before_training

# Sections that define the model's weights: a run cannot be resumed with other values.
_FIXED_ON_RESUME = ("model", "moe")


def run_train(config_path: str, overrides: list[str], run_dir: str | None,
              stop_at_step: int | None) -> int:
    watch = preemption.install()  # SIGUSR1/SIGTERM: save after the current step, exit 75
    cfg = config_lib.load(config_path, overrides)
    run_dir = Path(run_dir or Path("runs") / Path(config_path).stem)
    env = detect_env()
    check_layout(cfg, env.world_size)
    check_data(cfg, env.world_size)
    use_gpu = _use_gpu(cfg)
    _check_router(cfg)
    _check_resume(run_dir, cfg)
    _check_checkpoints(run_dir, cfg)
    fault = _test_fault()
    cfg = upcycle_before_training(config_path, overrides, cfg, run_dir, env)

    if not use_gpu:
        from moe_lab.compat import enable_cpu_compat

        enable_cpu_compat()
    init_distributed(cfg, env, use_gpu)
    try:
        import torch.distributed as dist

        from moe_lab.tracking import close_sinks
        from moe_lab.train import train

        sinks = _sinks(cfg, run_dir, env, config_path)
        if env.rank == 0:
            (run_dir / "config.yaml").write_text(config_lib.dump(cfg))
            print(f"run directory: {run_dir}  (layout {cfg.parallel.describe()}, "
                  f"world {env.world_size}, {'GPU' if use_gpu else 'CPU'})", flush=True)
        dist.barrier()
        from moe_lab.train.guard import NonFiniteError

        try:
            state = train(cfg, run_dir, sinks, use_gpu=use_gpu, stop_at_step=stop_at_step,
                          fault=fault, stop_requested=watch.should_stop)
        except NonFiniteError as err:
            close_sinks(sinks, err)
            print(f"moe-lab: stopped: {err}; the last good state is the newest checkpoint",
                  file=sys.stderr)
            return 3
        except BaseException as err:
            close_sinks(sinks, err)
            raise
        close_sinks(sinks)
    finally:
        shutdown_distributed()
    return watch.exit_code(state.step, cfg.training.max_steps)


def _check_router(cfg: ExperimentConfig) -> None:
    """Router name, parameters and their fit with the experiment, before any process starts."""
    if cfg.moe.enabled:
        from moe_lab.routers import resolve_router

        resolve_router(cfg.moe.router, cfg)


def _use_gpu(cfg: ExperimentConfig) -> bool:
    import torch

    if torch.cuda.is_available():
        check_transformer_engine(cfg)
        return True
    if cfg.optimizer.update_impl == "triton":
        raise ConfigError("optimizer.update_impl: triton needs a GPU; use auto or megatron on "
                          "the CPU", key="optimizer.update_impl")
    if cfg.training.precision != "fp32":
        raise ConfigError(f"training.precision: {cfg.training.precision} needs a GPU; "
                          "use fp32 on the CPU", key="training.precision")
    if cfg.model.backend == "te":
        raise ConfigError("model.backend: te (Transformer Engine) needs a GPU; use local or "
                          "torch on the CPU", key="model.backend")
    return False


def check_transformer_engine(cfg: ExperimentConfig) -> None:
    """The te backend and the precision-aware optimizer import Transformer Engine; refuse
    before any model is built when it is not installed."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        return
    if cfg.model.backend == "te":
        raise ConfigError("model.backend: te needs Transformer Engine, which is not installed; "
                          "use model.backend=torch", key="model.backend")
    if cfg.optimizer.precision_aware:
        raise ConfigError("optimizer.precision_aware: needs Transformer Engine's FusedAdam, "
                          "which is not installed", key="optimizer.precision_aware")


def _check_resume(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse to resume a run whose model differs from the config, before touching it."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    new = config_lib.to_dict(cfg)
    for section in _FIXED_ON_RESUME:
        for key, value in new[section].items():
            if saved.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"{section}.{key}: {value!r} differs from {saved.get(section, {}).get(key)!r} "
                    f"in {saved_path}; resume with the same model or choose another --run-dir",
                    key=f"{section}.{key}")


def _check_checkpoints(run_dir: Path, cfg: ExperimentConfig) -> None:
    """The checks loading makes (train/checkpoint.py), so that a run that cannot resume or
    initialise stops here with one line."""
    from moe_lab.train.manifest import CheckpointInvalid
    from moe_lab.train.resume import preflight

    try:
        preflight(run_dir, cfg)
    except CheckpointInvalid as err:
        raise UserError(str(err)) from None


def _test_fault():
    """MOE_LAB_TEST_FAULT (tests only): kill or poison at a named point (train/faults.py)."""
    spec = os.environ.get("MOE_LAB_TEST_FAULT")
    if not spec:
        return None
    from moe_lab.train.faults import Fault

    try:
        return Fault.parse(spec)
    except ValueError as err:
        raise UserError(f"MOE_LAB_TEST_FAULT: {err}") from None


def _sinks(cfg: ExperimentConfig, run_dir: Path, env, config_path: str) -> list:
    if env.rank != 0:
        return []
    from moe_lab.launch import progress
    from moe_lab.tracking import ConsoleSink, JsonlSink
    from moe_lab.train.resume import find_resumable

    run_dir.mkdir(parents=True, exist_ok=True)
    resume_step = find_resumable(run_dir, cfg).step
    quiet = progress.quiet()
    sinks = [JsonlSink(run_dir / "metrics.jsonl", resume_step=resume_step)]
    if not quiet:
        sinks.append(ConsoleSink(cfg.training.max_steps))
    if cfg.tracking.enabled:
        from moe_lab.launch.provenance import mlflow_sink

        sinks.append(mlflow_sink(cfg, run_dir, env, config_path, quiet))
    return sinks
