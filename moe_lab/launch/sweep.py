"""Running a sweep: members become run directories, launched as local processes or one Slurm
job array, with an MLflow parent run created first and finished members skipped.

SWEEP_DIR (default runs/sweeps/<sweep name>) holds one run directory per member,
`<member name>-<member id>`, the parent run's id (`mlflow_parent_run_id`) and, for Slurm, the
array's script (`job.sbatch`) and logs (`logs/<name>-<array id>_<task>.out`). A member is skipped
when it has finished (tracking/sweep_runs.py) or is still queued/running from an earlier call.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from moe_lab.config import ConfigError
from moe_lab.config.sweep import Member, Sweep, override_args
from moe_lab.launch.distributed import check_layout
from moe_lab.launch.progress import SweepProgress


@dataclass(frozen=True)
class MemberRun:
    member: Member
    run_dir: Path
    train_args: tuple[str, ...]  # `moe-lab train` arguments

    @property
    def label(self) -> str:
        return self.run_dir.name


def mlflow_environment() -> None:
    """For this process and the members it starts: MLflow's telemetry off (it phones home
    otherwise), and a dead tracking server fails in seconds instead of minutes of retries."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_members(sweep: Sweep, world_size: int) -> None:
    """Refuse the sweep before launching anything: layout and router of every member."""
    from moe_lab.routers import resolve_router

    for member in sweep.members:
        try:
            check_layout(member.config, world_size)
            if member.config.moe.enabled:
                resolve_router(member.config.moe.router)
        except ConfigError as err:
            raise ConfigError(f"{sweep.path}: member {member.name}: {err}", key=err.key) from None


def plan(sweep: Sweep, sweep_dir: Path, parent_run_id: str | None,
         experiment: str | None) -> list[MemberRun]:
    runs = []
    for member in sweep.members:
        run_dir = sweep_dir / member.dir_name
        tracking = {"tracking.sweep_id": sweep.id}
        if parent_run_id:
            tracking["tracking.parent_run_id"] = parent_run_id
            tracking["tracking.experiment"] = experiment
            if not member.config.tracking.run_name:
                tracking["tracking.run_name"] = member.name
        args = (sweep.base, "--run-dir", str(run_dir), *member.override_args(),
                *override_args(tracking))
        runs.append(MemberRun(member, run_dir, args))
    return runs


# -- local processes ---------------------------------------------------------------------------
def run_local(runs: list[MemberRun], max_parallel: int, progress_interval: float = 15.0) -> int:
    """Train the members as `moe-lab train` processes, max_parallel at a time; logs go to
    RUN_DIR/train.log, progress lines to stdout. Ctrl-C stops them with a checkpoint; the same
    command resumes them."""
    waiting = list(runs)
    active: dict[subprocess.Popen, tuple[MemberRun, float, object]] = {}
    failed = []
    progress = SweepProgress(len(runs), max_parallel, progress_interval)
    try:
        while waiting or active:
            while waiting and len(active) < max_parallel:
                run = waiting.pop(0)
                lock = _lock(run.run_dir)
                if lock is None:
                    print(f"  skip      {run.label}: another `moe-lab sweep` is training it")
                    continue
                log = open(run.run_dir / "train.log", "a")
                # Own session: Ctrl-C reaches only this process, which asks the members to
                # save (SIGTERM) instead of letting KeyboardInterrupt kill them mid-step.
                proc = subprocess.Popen([sys.executable, "-m", "moe_lab", "train",
                                         *run.train_args], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                active[proc] = (run, time.monotonic(), (lock, log))
                print(f"  started   {run.label}  (log {run.run_dir / 'train.log'})", flush=True)
            for proc in [p for p in active if p.poll() is not None]:
                run, started, handles = active.pop(proc)
                for handle in handles:
                    handle.close()
                seconds = time.monotonic() - started
                if proc.returncode == 0:
                    progress.finished(seconds)
                    print(f"  finished  {run.label} in {seconds:.0f} s", flush=True)
                else:
                    failed.append(run)
                    print(f"  FAILED    {run.label} (exit {proc.returncode}); log "
                          f"{run.run_dir / 'train.log'}", flush=True)
            now = time.monotonic()
            progress.maybe_print([(run.member.name, run.run_dir,
                                   run.member.config.training.max_steps, now - started)
                                  for run, started, _ in active.values()], len(waiting))
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc in active:
            proc.send_signal(signal.SIGTERM)  # save after the current step (launch/preemption)
        for proc in active:
            proc.wait()
        print("interrupted: running members saved a checkpoint; run the same command to resume",
              flush=True)
        return 130
    return 1 if failed else 0


def _lock(run_dir: Path):
    """An exclusive lock on RUN_DIR/.sweep.lock while a local process trains it, else None."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".sweep.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def locked_elsewhere(run_dir: Path) -> bool:
    if not (run_dir / ".sweep.lock").exists():
        return False
    handle = _lock(run_dir)
    if handle is None:
        return True
    handle.close()
    return False


# -- Slurm -------------------------------------------------------------------------------------
def slurm_job_of(run_dir: Path) -> str | None:
    """The array task (`ARRAYID_TASK`) that last trained this member, if any."""
    path = run_dir / "slurm_job_id"
    return path.read_text().strip() if path.is_file() else None


def slurm_script(runs: list[MemberRun], sweep: Sweep, sweep_dir: Path, resources, template,
                 max_parallel: int | None) -> str:
    from moe_lab.launch import sbatch

    tasks = [sbatch.Task(run.run_dir, run.train_args) for run in runs]
    array = f"0-{len(tasks) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    return sbatch.render(template, resources, tasks, job_name=sweep.name,
                         log_file=sweep_dir / "logs" / "%x-%A_%a.out", workdir=Path.cwd(),
                         array=array)


def submit_array(script: str, runs: list[MemberRun], sweep_dir: Path, wait: bool) -> int:
    from moe_lab.launch import sbatch

    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    script_path = sweep_dir / "job.sbatch"
    script_path.write_text(script)

    def record(job_id: str) -> None:
        for task, run in enumerate(runs):
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "slurm_job_id").write_text(f"{job_id}_{task}\n")
        print(f"submitted array job {job_id} ({len(runs)} tasks); logs in {sweep_dir / 'logs'}",
              flush=True)

    _, code = sbatch.submit(script_path, wait=wait, on_submitted=record)
    return code
