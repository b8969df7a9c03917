"""sbatch scripts: what a job asks Slurm for, rendering slurm/train.sbatch, and sbatch/squeue.

The template (slurm/train.sbatch) holds every line a job may need with `{{name}}` values; a line
whose value is empty is dropped and a line whose value is a list is repeated per item, so the
template stays a readable shell script. A job trains one or more tasks (an array job: one per
task id); each task is a run directory and the `moe-lab train` arguments that fill it.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from moe_lab.launch.cli import UserError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO / "slurm" / "train.sbatch"
_PLACEHOLDER = re.compile(r"{{(\w+)}}")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass(frozen=True)
class Task:
    """One training run of a job: `moe-lab train` with these arguments, into run_dir."""

    run_dir: Path
    train_args: tuple[str, ...]


@dataclass(frozen=True)
class JobResources:
    """What one job (or each task of an array) asks Slurm for."""

    nodes: int
    gpus_per_node: int
    time: str
    tasks_per_node: int | None = None  # default: one per GPU (one without GPUs)
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    container: str | None = None  # a pyxis/enroot image: srun --container-image
    container_mounts: str | None = None
    signal_seconds: int = 300  # USR1 this long before the time limit
    max_requeues: int = 20
    sbatch_options: tuple[str, ...] = ()  # extra `#SBATCH --KEY=VALUE` lines

    def __post_init__(self):
        if self.nodes < 1:
            raise UserError(f"--nodes: must be >= 1, got {self.nodes}")
        for flag, value, least in (("--gpus-per-node", self.gpus_per_node, 0),
                                   ("--tasks-per-node", self.tasks_per_node, 1),
                                   ("--cpus-per-task", self.cpus_per_task, 1),
                                   ("--max-requeues", self.max_requeues, 0)):
            if value is not None and value < least:
                raise UserError(f"{flag}: must be >= {least}, got {value}")
        limit = time_limit_seconds(self.time)
        if not 0 < self.signal_seconds < limit:
            raise UserError(f"--signal-seconds: {self.signal_seconds} must be between 0 and the "
                            f"time limit --time {self.time} ({limit} s)")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def time_limit_seconds(text: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = _TIME.match(text.strip())
    if not match:
        raise UserError(f"--time: {text!r} is not a Slurm time (HH:MM:SS, D-HH:MM:SS or minutes)")
    days, a, b, c = match.groups()
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # H:M:S
        hours, minutes, seconds = int(a), int(b), int(c)
    else:  # M or M:S
        hours, minutes, seconds = 0, int(a), int(b or 0)
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def render(template: Path, resources: JobResources, tasks: list[Task], *, job_name: str,
           log_file: Path, workdir: Path, array: str | None = None) -> str:
    """The sbatch script for these tasks (several tasks need `array`, e.g. "0-3%2")."""
    container = resources.container
    values = {
        "job_name": job_name,
        "nodes": resources.nodes,
        "tasks_per_node": resources.ntasks_per_node,
        "gpus_per_node": resources.gpus_per_node or None,
        "cpus_per_task": resources.cpus_per_task,
        "time": resources.time,
        "partition": resources.partition,
        "account": resources.account,
        "array": array,
        "workdir": workdir,
        "log_file": log_file,
        "signal_seconds": resources.signal_seconds,
        "sbatch_options": [f"--{o.lstrip('-')}" for o in resources.sbatch_options],
        "tasks": [_task_line(i, task) for i, task in enumerate(tasks)],
        "repo": REPO,
        "exit_timeout": _exit_timeout(resources.signal_seconds),
        "max_requeues": resources.max_requeues,
        "container_image": container,
        "container_mounts": (resources.container_mounts or _default_mounts(workdir))
        if container else None,
        "workdir_in_container": workdir if container else None,
        # Inside a container its own python; outside, the one running this (shared filesystem).
        "python": "python" if container else sys.executable,
    }
    return fill(template, values)


def fill(template: Path, values: dict) -> str:
    try:
        text = Path(template).read_text()
    except OSError as err:
        raise UserError(f"--template: cannot read {template}: {err.strerror}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        names = _PLACEHOLDER.findall(line)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise UserError(f"{template}:{number}: unknown placeholder {{{{{unknown[0]}}}}} "
                            f"(known: {', '.join(sorted(values))})")
        repeated = [n for n in names if isinstance(values[n], list)]
        if repeated:
            lines += [_substitute(line, {**values, repeated[0]: item})
                      for item in values[repeated[0]]]
        elif all(values[n] not in (None, "") for n in names):
            lines.append(_substitute(line, values))
    return "\n".join(lines) + "\n"


def _substitute(line: str, values: dict) -> str:
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line)


def _task_line(index: int, task: Task) -> str:
    args = " ".join(shlex.quote(a) for a in task.train_args)
    return f"{index}) RUN_DIR={shlex.quote(str(task.run_dir))}; TRAIN_ARGS=({args}) ;;"


def _exit_timeout(signal_seconds: int) -> int:
    """Leave the batch script ~30 s to requeue after training was given up on."""
    return max(10, signal_seconds - 30)


def _default_mounts(workdir: Path) -> str:
    dirs = [workdir] + ([REPO] if not REPO.is_relative_to(workdir) else [])
    return ",".join(f"{d}:{d}" for d in dirs)


# -- talking to Slurm -------------------------------------------------------------------------
def submit(script: Path, wait: bool = False, on_submitted=None) -> tuple[str, int]:
    """`sbatch --parsable SCRIPT` -> (job id, exit code: the job's with `wait`, else 0).

    on_submitted(job_id) runs as soon as the id is known, before waiting for the job.
    """
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise UserError("sbatch: not found; run on a Slurm login node, or use --dry-run") from None
    # --parsable prints "ID[;CLUSTER]" at once; with --wait sbatch then waits for the job.
    job_id = proc.stdout.readline().strip().split(";")[0]
    if job_id and on_submitted:
        on_submitted(job_id)
    out, err = proc.communicate()
    if not job_id:
        raise UserError(f"sbatch failed: {err.strip() or out.strip()}")
    return job_id, proc.returncode if wait else 0


def active_jobs(job_ids: list[str]) -> set[str]:
    """Those of job_ids (plain or array `A_T` ids) that Slurm still has pending or running."""
    if not job_ids:
        return set()
    try:
        result = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-t", "PD,R,CG,RQ,RS,S,CF"],
                                capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return set()
    queued = set(result.stdout.split())
    return {j for j in job_ids if j in queued}


def add_resource_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """The options of `submit` and `sweep --launcher slurm` that become JobResources."""
    group = parser.add_argument_group("Slurm resources")
    group.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
    group.add_argument("--gpus-per-node", type=int, required=required, metavar="G",
                       help="GPUs per node; one training task per GPU (0: CPU nodes)")
    group.add_argument("--time", required=required, metavar="HH:MM:SS",
                       help="time limit per job; preempted jobs resume after requeue")
    group.add_argument("--tasks-per-node", type=int, metavar="T",
                       help="training processes per node (default: one per GPU, 1 without)")
    group.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per training process")
    group.add_argument("--partition", metavar="P", help="Slurm partition")
    group.add_argument("--account", metavar="A", help="Slurm account to charge")
    group.add_argument("--container", metavar="IMG",
                       help="run inside this image with pyxis (srun --container-image), "
                            "e.g. nvcr.io#nvidia/pytorch:25.04-py3")
    group.add_argument("--container-mounts", metavar="SRC:DST,...",
                       help="pyxis mounts (default: the working directory and the moe-lab code)")
    group.add_argument("--signal-seconds", type=int, default=300, metavar="S",
                       help="send USR1 S seconds before the time limit: save, requeue (300)")
    group.add_argument("--max-requeues", type=int, default=20, metavar="N",
                       help="stop requeueing after N restarts (20)")
    group.add_argument("--sbatch-option", action="append", default=[], metavar="KEY[=VALUE]",
                       help="extra #SBATCH line, repeatable, e.g. --sbatch-option qos=high")
    group.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE, metavar="FILE",
                       help="sbatch template to render (default: slurm/train.sbatch)")


def resources_from_args(args) -> JobResources:
    return JobResources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
        tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        partition=args.partition, account=args.account, container=args.container,
        container_mounts=args.container_mounts, signal_seconds=args.signal_seconds,
        max_requeues=args.max_requeues, sbatch_options=tuple(args.sbatch_option))
