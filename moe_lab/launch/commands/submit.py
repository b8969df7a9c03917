"""`moe-lab submit CONFIG [key=value ...] --nodes N --gpus-per-node G --time T`: one Slurm job.

Checks the config and its layout for the job's world size, renders slurm/train.sbatch, and
prints it (--dry-run) or submits it; the run directory then holds the script (`job.sbatch`), the
job id (`slurm_job_id`) and the job's log (`logs/<job name>-<job id>.out`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  moe-lab submit experiments/tiny_moe.yaml --nodes 2 --gpus-per-node 8 --time 04:00:00 \\
      --partition gpu --account myproj parallel.ep=8
  moe-lab submit qwen1.5-moe-a2.7b --nodes 4 --gpus-per-node 8 --time 1-00:00:00 \\
      --container nvcr.io#nvidia/pytorch:25.04-py3 --run-dir /shared/runs/a2.7b --dry-run
"""


def register(subparsers) -> None:
    from moe_lab.launch.sbatch import add_resource_options

    parser = subparsers.add_parser(
        "submit", help="train on Slurm: render slurm/train.sbatch and submit it",
        description="Submit one training job to Slurm (one task per GPU through srun). A job "
                    "stopped by its time limit or preemption saves, requeues itself and resumes "
                    "into the same run directory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML file or preset name")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. optimizer.lr=1e-3")
    parser.add_argument("--run-dir", help="run directory (default: runs/<config file stem>)")
    parser.add_argument("--job-name", help="Slurm job name (default: the config file stem)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script; submit and write nothing")
    parser.add_argument("--wait", action="store_true",
                        help="wait until the job has ended (requeues included); exit with its code")
    add_resource_options(parser, required=True)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from moe_lab import config as config_lib
    from moe_lab.launch.cli import UserError
    from moe_lab.launch.distributed import check_layout
    from moe_lab.launch.run import _check_resume
    from moe_lab.launch import sbatch

    resources = sbatch.resources_from_args(args)
    cfg = config_lib.load(args.config, args.overrides)
    check_layout(cfg, resources.world_size)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem).resolve()
    _check_resume(run_dir, cfg)
    task = sbatch.Task(run_dir, (config_argument(args.config), "--run-dir", str(run_dir),
                                 *args.overrides))
    job_name = args.job_name or Path(args.config).stem
    script = sbatch.render(args.template, resources, [task], job_name=job_name,
                           log_file=run_dir / "logs" / "%x-%j.out", workdir=Path.cwd())
    if args.dry_run:
        print(script, end="")
        return 0

    previous = _recorded_job(run_dir)
    if previous and sbatch.active_jobs([previous]):
        raise UserError(f"{run_dir}: job {previous} is still queued or running on it; wait, "
                        f"scancel it, or choose another --run-dir")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    script_path = run_dir / "job.sbatch"
    script_path.write_text(script)

    def record(job_id: str) -> None:
        (run_dir / "slurm_job_id").write_text(job_id + "\n")
        print(f"submitted job {job_id}: {run_dir}  (log: {run_dir}/logs/{job_name}-{job_id}.out)",
              flush=True)

    _, code = sbatch.submit(script_path, wait=args.wait, on_submitted=record)
    return code


def config_argument(config: str) -> str:
    """A config file as an absolute path (jobs may start elsewhere); a preset name as it is."""
    path = Path(config)
    return str(path.resolve()) if path.is_file() else config


def _recorded_job(run_dir: Path) -> str | None:
    path = run_dir / "slurm_job_id"
    return path.read_text().strip() if path.is_file() else None
