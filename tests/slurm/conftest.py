"""A real Slurm cluster for this package's tests: slurmctld + 3 slurmd on 127.0.0.1, started once
per session from Debian's packages (scripts/ci.d/slurm.sh installs them) and stopped by pid file.
"""

from __future__ import annotations

import pytest

from moe_lab.testing import run_cli
from moe_lab.testing.slurm_cluster import LocalSlurmCluster, slurm_available

# A CPU job with a time limit far from its USR1 (which comes --signal-seconds=300 before it).
CPU_JOB = ["--gpus-per-node", "0", "--time", "00:20:00"]
FAST = ["optimizer.warmup_steps=0", "training.log_interval=1", "tracking.enabled=false"]


def job_log(run_dir) -> str:
    """Every Slurm log of a run directory (a requeued job appends to its own)."""
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if not slurm_available():
        pytest.skip("Slurm is not installed (scripts/ci.d/slurm.sh installs it)")
    # A short path: slurmd's spool holds unix sockets (at most 108 characters).
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=3, cpus=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def moe_lab_on(slurm_cluster):
    """`moe-lab ARGS` as a fresh process that talks to the test cluster."""

    def run(args, cwd, timeout=600):
        return run_cli([str(a) for a in args], cwd=cwd, timeout=timeout, env=slurm_cluster.env)

    return run
