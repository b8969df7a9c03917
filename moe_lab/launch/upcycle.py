"""`moe-lab upcycle` and upcycling at the start of `moe-lab train` (`upcycle.source` set).

Everything the user gave is checked first (config, the dense source's config, the output
directory), then the dense weights are read and the MoE written in a world of one process on the
CPU. A training run upcycles on its first start only: its rank 0 runs `moe-lab upcycle` into
RUN_DIR/upcycled as a separate process (a world of one, whatever the run's layout) while the
other ranks wait for it in the process-group rendezvous; the run then starts from those weights
through checkpoint.init_from. A resumed run never upcycles again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from moe_lab import config as config_lib
from moe_lab.config import ConfigError, ExperimentConfig
from moe_lab.launch.distributed import DistributedEnv, detect_env, init_distributed, shutdown_distributed

UPCYCLED_DIR = "upcycled"
# Variables that would make the upcycling process join the training run's world.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                       "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_", "SLURM_")


def run_upcycle(config_path: str | None, dense_path: str | None, out: str,
                overrides: list[str]) -> int:
    from moe_lab.launch.cli import UserError

    cfg, source = resolve(config_path, dense_path, overrides)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--to {out}: already exists and is not empty; choose a new directory")
    report = _in_world_of_one(cfg, lambda: _write(cfg, source, out))
    _print_summary(report, source, out)
    return 0


def resolve(config_path: str | None, dense_path: str | None, overrides: list[str]):
    """The MoE config and the dense source, checked against each other (nothing read yet)."""
    from moe_lab.upcycle import make_plan
    from moe_lab.upcycle.source import open_dense

    if config_path is None:
        if dense_path is None:
            raise ConfigError("upcycle.source: give the dense model with --from DENSE, or a "
                              "config with upcycle.source", key="upcycle.source")
        source = open_dense(dense_path)
        cfg = _load_from_dense(source, ["checkpoint.init_from=null", *overrides])
    else:
        cfg = config_lib.load(config_path, overrides)
        path = dense_path or cfg.upcycle.source
        if path is None:
            raise ConfigError("upcycle.source: not set; give --from DENSE",
                              key="upcycle.source")
        source = open_dense(path)
    cfg = dataclasses.replace(cfg, upcycle=dataclasses.replace(cfg.upcycle,
                                                               source=str(source.path)))
    if cfg.checkpoint.init_from:
        raise ConfigError("checkpoint.init_from: upcycling makes the initial weights; leave it "
                          "unset when upcycle.source is set", key="checkpoint.init_from")
    _check_same_model(cfg, source)
    make_plan(cfg)
    return cfg, source


def upcycle_before_training(config_path: str, overrides: list[str], cfg: ExperimentConfig,
                            run_dir: Path, env: DistributedEnv) -> ExperimentConfig:
    """On a run's first start with upcycle.source set: the config that starts from
    RUN_DIR/upcycled, which rank 0 has written by then. Otherwise `cfg` unchanged."""
    from moe_lab.launch.cli import UserError
    from moe_lab.train.checkpoint import latest_checkpoint
    from moe_lab.upcycle.writer import read_report, settings_of

    if cfg.upcycle.source is None or latest_checkpoint(run_dir) is not None:
        return cfg
    checked, _ = resolve(config_path, None, overrides)  # every rank refuses bad input alike
    out = Path(run_dir) / UPCYCLED_DIR
    report = read_report(out)
    if env.rank == 0 and (report is None or report["settings"] != settings_of(checked)):
        shutil.rmtree(out, ignore_errors=True)  # ours: unfinished, or made with other settings
        command = [sys.executable, "-m", "moe_lab", "upcycle", "--config", config_path,
                   "--to", str(out), *overrides]
        if subprocess.run(command, env=_world_of_one_environment()).returncode != 0:
            raise UserError(f"upcycling into {out} failed (the error is above)")
    return dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=str(out)))


def _load_from_dense(source, overrides: list[str]) -> ExperimentConfig:
    """The dense run's own config with the MoE settings applied."""
    if source.config_file is not None:
        return config_lib.load(source.config_file, overrides)
    with tempfile.TemporaryDirectory() as tmp:  # a Hugging Face source: its config as YAML
        path = Path(tmp) / "dense.yaml"
        path.write_text(config_lib.dump(source.config))
        return config_lib.load(path, overrides)


def _check_same_model(cfg: ExperimentConfig, source) -> None:
    dense = source.config.model
    for field in dataclasses.fields(dense):
        if field.name == "backend":  # the weights are the same whatever modules run them
            continue
        mine, theirs = getattr(cfg.model, field.name), getattr(dense, field.name)
        if mine != theirs:
            raise ConfigError(
                f"model.{field.name}: {mine!r} differs from the dense model's {theirs!r} "
                f"({source.config_file or source.path}); upcycling keeps every model setting",
                key=f"model.{field.name}")


def _in_world_of_one(cfg: ExperimentConfig, work):
    import torch

    from moe_lab.upcycle.template import single_process

    if not torch.cuda.is_available():
        from moe_lab.compat import enable_cpu_compat

        enable_cpu_compat()
    init_distributed(single_process(cfg), detect_env({}), use_gpu=False)
    try:
        return work()
    finally:
        shutdown_distributed()


def _write(cfg, source, out: Path) -> dict:
    from moe_lab.upcycle.writer import write_upcycled

    return write_upcycled(cfg, source, out)


def _world_of_one_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARIABLES)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # upcycling runs on the CPU; leave the GPUs to training
    return env


def _print_summary(report: dict, source, out: Path) -> None:
    mem = report["memory"]
    mib = 2**20
    shared = f", shared expert {report['shared_expert_ffn']}" if report["shared_expert_ffn"] else ""
    print(f"upcycled {source.checkpoint or source.path} -> {out} ({report['method']}): "
          f"{len(report['moe_layers'])} MoE layers of {report['num_experts']} experts x "
          f"{report['expert_ffn']} (top-{report['topk']}{shared}) from a dense FFN of "
          f"{report['dense_ffn']}")
    fresh = report["reinit_fraction_mean"]
    reinit = (f"re-initialised {fresh:.3g} of each expert by {report['reinit']['granularity']}"
              if fresh else "no re-initialisation")
    print(f"  router {report['router_init']}, weight scale {report['weight_scale']:.4g} "
          f"[{report['weight_scale_rule']}], {reinit}")
    print(f"  memory: peak RSS {mem['peak_rss_bytes'] / mib:.0f} MiB "
          f"({mem['rss_before_reading_bytes'] / mib:.0f} MiB before reading the dense weights); "
          f"dense weights {mem['dense_bytes'] / mib:.1f} MiB, MoE weights "
          f"{mem['moe_bytes'] / mib:.1f} MiB")
    print(f"  report: {out / 'upcycle_report.json'}")
    print(f"  train from it: moe-lab train {out / 'upcycled.yaml'} --run-dir runs/NAME")
