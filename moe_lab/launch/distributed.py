"""Process-group start-up and teardown: the only reader of torchrun/Slurm environment variables.

Rank, world size and master come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first node of
SLURM_JOB_NODELIST); a plain `moe-lab train` is a world of one on a free loopback port.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_lab.config import ConfigError, ExperimentConfig


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def detect_env(environ=os.environ) -> DistributedEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistributedEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        return DistributedEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR") or _first_slurm_node(environ),
            # One port per job, so two jobs sharing a node do not collide.
            master_port=int(environ.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    return DistributedEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def _first_slurm_node(environ) -> str:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                               capture_output=True, text=True).stdout.split()[0]
        # NodeAddr resolves even where node names do not (e.g. several slurmd on one host).
        info = subprocess.run(["scontrol", "show", "node", first, "-o"], check=True,
                              capture_output=True, text=True).stdout
        for field in info.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
        return first
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_layout(cfg: ExperimentConfig, world_size: int) -> None:
    """Refuse a parallel layout that does not fit the world, before any process group starts."""
    p = cfg.parallel
    if world_size % p.model_parallel_size:
        raise ConfigError(
            f"parallel: tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {p.model_parallel_size} does not divide "
            f"the world size {world_size}", key="parallel")
    if world_size % (p.ep * p.etp * p.pp):
        raise ConfigError(
            f"parallel.ep: ep*etp*pp = {p.ep}*{p.etp}*{p.pp} does not divide the world size "
            f"{world_size}", key="parallel.ep")
    dp = p.data_parallel_size(world_size)
    t = cfg.training
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}",
            key="training.global_batch_size")


def init_distributed(cfg: ExperimentConfig, env: DistributedEnv, use_gpu: bool) -> None:
    from megatron.core import parallel_state

    if use_gpu:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend="nccl" if use_gpu else "gloo",
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=10),
    )
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
    )


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
