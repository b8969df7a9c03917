"""Where a run was started from: code version, machine, GPUs, Slurm job. Tags for its MLflow run.

Lives in launch/ because it reads the environment (Slurm variables, the user); tracking/ gets the
result as a plain dict.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
from pathlib import Path

from moe_lab.config import ExperimentConfig
from moe_lab.launch.distributed import DistributedEnv

REPO = Path(__file__).resolve().parents[2]
# Slurm variable -> tag; present only inside a Slurm job.
_SLURM_TAGS = {
    "SLURM_JOB_ID": "slurm.job_id",
    "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
    "SLURM_ARRAY_TASK_ID": "slurm.array_task_id",
    "SLURM_JOB_NAME": "slurm.job_name",
    "SLURM_JOB_NUM_NODES": "slurm.nodes",
    "SLURM_RESTART_COUNT": "slurm.restart_count",
}


def run_tags(env: DistributedEnv, config_path: str, environ=os.environ) -> dict[str, str]:
    tags = {"host": socket.gethostname(), "world_size": str(env.world_size),
            "launcher": env.launcher, "config_file": str(config_path),
            "mlflow.source.name": "moe-lab train", "mlflow.source.type": "LOCAL",
            "mlflow.user": _user()}
    tags.update(_gpu_tags())
    tags.update(_git_tags(REPO))
    tags.update({tag: environ[var] for var, tag in _SLURM_TAGS.items() if environ.get(var)})
    return tags


def mlflow_sink(cfg: ExperimentConfig, run_dir: Path, env: DistributedEnv, config_path: str,
                quiet: bool):
    from moe_lab.tracking.mlflow_sink import MlflowSink

    return MlflowSink(cfg, run_dir, run_tags(env, config_path),
                      stream=None if quiet else sys.stdout)


def _gpu_tags() -> dict[str, str]:
    import torch

    if not torch.cuda.is_available():
        return {"gpu.type": "none (CPU)", "gpu.count": "0"}
    return {"gpu.type": torch.cuda.get_device_name(0),
            "gpu.count": str(torch.cuda.device_count())}


def _git_tags(repo: Path) -> dict[str, str]:
    """Commit and dirty flag of the moe-lab checkout (nothing when installed without git)."""
    try:
        commit = _git(repo, "rev-parse", "HEAD").strip()
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.commit": commit,
            "git.dirty": str(dirty).lower()}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
