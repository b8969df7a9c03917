"""Run `moe-lab` as real processes: one, several under torchrun, or several with srun's variables.

Every rank gets OMP_NUM_THREADS=1 (ranks share the CPU cores) and TORCHDYNAMO_DISABLE=1
(megatron's fused kernels are torch.compile functions, which only cost start-up on the CPU).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(extra: dict | None = None) -> dict:
    """This process's environment for a child moe-lab/test process: no launcher or Slurm
    variables, one thread per rank, no compile, no telemetry, the repository importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], timeout: float = 300, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m moe_lab ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "moe_lab", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO, env=child_env(env))


def run_distributed(nproc: int, args: list[str], timeout: float = 600,
                    cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m moe_lab ARGS` on a free loopback port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "moe_lab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO, env=child_env())


def run_srun_style(nproc: int, args: list[str], timeout: float = 600,
                   cwd: Path | None = None) -> list[subprocess.CompletedProcess]:
    """Start N processes with the variables srun gives its tasks (no torchrun variables)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = child_env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nproc),
                    "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "4242",
                    "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-m", "moe_lab", *args], cwd=cwd or REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results
