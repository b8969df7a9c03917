"""A real Slurm cluster on loopback for tests: one slurmctld and N slurmd, all in one folder.

Debian's `slurmctld`, `slurmd` and `slurm-client` packages (scripts/ci.d/slurm.sh installs them).
Nodes are `n1..nN`, all on 127.0.0.1 with their own port; authentication is `auth/none`, so no
munged is needed. Clients find the cluster through SLURM_CONF (`cluster.env`). Daemons are
stopped by their pid files, after every job has been cancelled.

    with LocalSlurmCluster(tmp_dir, nodes=3) as cluster:
        subprocess.run(["sbatch", ...], env={**os.environ, **cluster.env})
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "scontrol", "sbatch")


def slurm_available() -> bool:
    return all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS)


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurmCluster:
    """slurmctld + `nodes` slurmd on 127.0.0.1, each node with `cpus` CPUs, one partition."""

    def __init__(self, root: Path, nodes: int = 3, cpus: int = 1):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        self.env = {"SLURM_CONF": str(self.conf)}

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        self._run([_daemon("slurmctld"), "-f", str(self.conf)])
        for node in self.nodes:
            self._run([_daemon("slurmd"), "-f", str(self.conf), "-N", node])
        self._wait_idle(timeout)

    def stop(self) -> None:
        """Cancel every job, wait for its steps to end, then stop the daemons by pid file."""
        subprocess.run(["scancel", "--full", "--quiet", f"--user={getpass.getuser()}"],
                       env=self._env(), capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.squeue():
            time.sleep(0.3)
        _stop_by_pid_files([*(self.root / f"slurmd-{n}.pid" for n in self.nodes),
                            self.root / "slurmctld.pid"])

    # -- queries ---------------------------------------------------------------------------
    def squeue(self) -> list[str]:
        """Job ids still known as pending or running."""
        result = subprocess.run(["squeue", "-h", "-o", "%i", "-t", "PD,R,CG,S,CF,RQ,RS,SE"],
                                env=self._env(), capture_output=True, text=True, timeout=30)
        return result.stdout.split() if result.returncode == 0 else []

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """The jobcomp records of a job (`ID` or array task `ARRAYID_TASK`), oldest first: one
        per end, so a requeued job has a PENDING record before its final one. Unlike `scontrol
        show job`, they outlive MinJobAge."""
        array_id, _, task = str(job_id).partition("_")
        records = []
        text = self.jobcomp.read_text() if self.jobcomp.exists() else ""
        for line in text.splitlines():
            fields = dict(token.partition("=")[::2] for token in line.split())
            if (fields.get("ArrayJobId"), fields.get("ArrayTaskId")) == (array_id, task) or \
                    (not task and fields.get("JobId") == array_id):
                records.append(fields)
        return records

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "logs").glob("*.log")):
            parts.append(f"== {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def client_env(self) -> dict:
        """The environment for `moe-lab`/sbatch processes of a test: clean, plus SLURM_CONF."""
        from moe_lab.testing.distributed import child_env

        return child_env(self.env)

    # -- internals -------------------------------------------------------------------------
    def _env(self) -> dict:
        return {**os.environ, **self.env}

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(cmd, env=self._env(), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr}\n{self.log_tail()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self._env(),
                                    capture_output=True, text=True, timeout=30)
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            if result.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise TimeoutError(f"Slurm nodes not idle after {timeout} s\n{self.log_tail()}")

    def _config(self) -> str:
        user = getpass.getuser()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus} State=UNKNOWN" for n, port in zip(self.nodes, node_ports))
        return f"""\
# Written by moe_lab.testing.slurm_cluster: a test cluster on 127.0.0.1.
ClusterName=moelabtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
AuthInfo=cred_expire=5
CommunicationParameters=NoInAddrAny
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/logs/slurmctld.log
SlurmdLogFile={r}/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
ReturnToService=2
SlurmdParameters=config_overrides
# `sbatch --wait` polls after 2 s, then backs off by x4 while below MinJobAge/2 and 32 s: here
# every 8 s (with the default 300: 32 s). Ended jobs leave `scontrol show job` after MinJobAge s
# (the tests read the jobcomp file instead).
MinJobAge=10
KillWait=10
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def _stop_by_pid_files(pid_files: list[Path], timeout: float = 15) -> None:
    """SIGTERM every daemon named in pid_files, wait for all, SIGKILL what is left."""
    pids = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError):
            continue  # no pid file, or the daemon is gone already
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
