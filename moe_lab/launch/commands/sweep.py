"""`moe-lab sweep SWEEP.yaml [key=value ...] [--launcher {local,slurm}] [--max-parallel K]`.

Order: read and check every member (unknown keys, empty grid, layout, router) -> find which
members are finished or still running -> create the MLflow parent run -> launch the rest as local
processes or one Slurm job array (`--array=0-N%K`). Running it again skips finished members.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

EPILOG = """examples:
  moe-lab sweep experiments/router_ablation_small.yaml --max-parallel 2
  moe-lab sweep experiments/router_ablation.yaml training.max_steps=50   # every member shorter
  moe-lab sweep experiments/router_ablation.yaml --launcher slurm --gpus-per-node 8 \\
      --time 08:00:00 --partition gpu --max-parallel 4
  moe-lab sweep experiments/router_ablation.yaml --launcher slurm --gpus-per-node 8 \\
      --time 08:00:00 --dry-run
"""


def register(subparsers) -> None:
    from moe_lab.launch.sbatch import add_resource_options

    parser = subparsers.add_parser(
        "sweep", help="run every member of a sweep file, locally or as a Slurm job array",
        description="Run a sweep (base config, shared overrides, grid and/or members): an MLflow "
                    "parent run with one child per member; finished members are skipped, so "
                    "the same command resumes an interrupted sweep.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", metavar="SWEEP.yaml",
                        help="sweep file: base config, shared overrides, grid and/or members")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every member, applied after the file's")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local processes, or one Slurm job array (default local)")
    parser.add_argument("--max-parallel", type=int, metavar="K",
                        help="members at a time (local default 1; Slurm: --array=0-N%%K, "
                             "default unthrottled)")
    parser.add_argument("--sweep-dir", help="where the member run directories go "
                                            "(default runs/sweeps/<sweep name>)")
    parser.add_argument("--progress-every", type=float, default=15.0, metavar="SECONDS",
                        help="local: a progress line per running member this often (default 15)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run (the sbatch script for Slurm); change nothing")
    parser.add_argument("--wait", action="store_true",
                        help="Slurm: wait until the array has ended; exit with its highest code")
    add_resource_options(parser, required=False)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from moe_lab.config.sweep import load_sweep
    from moe_lab.launch import sweep as sweeps
    from moe_lab.launch.cli import UserError

    sweeps.mlflow_environment()
    if args.max_parallel is not None and args.max_parallel < 1:
        raise UserError(f"--max-parallel: must be >= 1, got {args.max_parallel}")
    spec = load_sweep(args.sweep, args.overrides)
    resources = _resources(args)
    sweeps.check_members(spec, resources.world_size if resources else 1)
    sweep_dir = Path(args.sweep_dir or Path("runs") / "sweeps" / spec.name).resolve()
    store = _store(spec)

    states = _member_states(spec, sweep_dir, store)
    todo = [m for m in spec.members if states[m.id] == "to run"]
    print(f"sweep {spec.name} ({spec.id}): {len(spec.members)} members, "
          f"{sum(s == 'finished' for s in states.values())} finished, "
          f"{sum(s not in ('finished', 'to run') for s in states.values())} queued or running, "
          f"{len(todo)} to run  [{sweep_dir}]", flush=True)
    for member in spec.members:
        print(f"  {states[member.id]:<9} {member.dir_name}")
    if not todo:
        if not args.dry_run:
            _finish_parent_if_done(spec, sweep_dir, store, states)
        return 0

    parent_run_id = _parent_run(spec, sweep_dir, store, dry_run=args.dry_run)
    todo_ids = {m.id for m in todo}
    runs = [r for r in sweeps.plan(spec, sweep_dir, parent_run_id, store and store.experiment)
            if r.member.id in todo_ids]
    if args.launcher == "slurm":
        script = sweeps.slurm_script(runs, spec, sweep_dir, resources, args.template,
                                     args.max_parallel)
        if args.dry_run:
            print(script, end="")
            return 0
        code = sweeps.submit_array(script, runs, sweep_dir, wait=args.wait)
        if args.wait:
            _finish_parent_if_done(spec, sweep_dir, store, _member_states(spec, sweep_dir, store))
        return code
    if args.dry_run:
        for run in runs:
            print("moe-lab train " + shlex.join(run.train_args))
        return 0
    code = sweeps.run_local(runs, args.max_parallel or 1, args.progress_every)
    _finish_parent_if_done(spec, sweep_dir, store, _member_states(spec, sweep_dir, store))
    return code


def _resources(args):
    from moe_lab.launch import sbatch
    from moe_lab.launch.cli import UserError

    if args.launcher != "slurm":
        return None
    missing = [flag for flag, value in (("--gpus-per-node", args.gpus_per_node),
                                        ("--time", args.time)) if value is None]
    if missing:
        raise UserError(f"--launcher slurm needs {' and '.join(missing)}")
    return sbatch.resources_from_args(args)


def _store(spec):
    """Where the parent run goes: the first tracked member's MLflow store; None if untracked."""
    from moe_lab.tracking import sweep_runs

    tracked = [m.config for m in spec.members if m.config.tracking.enabled]
    if not tracked:
        print("tracking.enabled is false: no MLflow parent run; members count as finished when "
              "their checkpoint reaches training.max_steps")
        return None
    experiment = tracked[0].tracking.experiment or spec.name
    return sweep_runs.store_for(tracked[0], experiment, Path.cwd())


def _member_states(spec, sweep_dir: Path, store) -> dict[str, str]:
    """member id -> "finished", "queued" (a Slurm job has it), "running" (locally) or "to run"."""
    from moe_lab.launch import sbatch
    from moe_lab.launch import sweep as sweeps
    from moe_lab.tracking import sweep_runs

    jobs = {m.id: sweeps.slurm_job_of(sweep_dir / m.dir_name) for m in spec.members}
    active = sbatch.active_jobs([j for j in jobs.values() if j])
    done = sweep_runs.finished([(sweep_dir / m.dir_name, m.config.training.max_steps,
                                 m.config.tracking.enabled) for m in spec.members], store)
    states = {}
    for member, finished in zip(spec.members, done):
        if finished:
            states[member.id] = "finished"
        elif jobs[member.id] in active:
            states[member.id] = "queued"
        elif sweeps.locked_elsewhere(sweep_dir / member.dir_name):
            states[member.id] = "running"
        else:
            states[member.id] = "to run"
    return states


def _parent_run(spec, sweep_dir: Path, store, dry_run: bool) -> str | None:
    from moe_lab.launch.cli import UserError
    from moe_lab.tracking import sweep_runs

    if store is None:
        return None
    if dry_run:
        return "PARENT_RUN_ID"
    description = {"sweep": spec.name, "id": spec.id, "file": str(spec.path), "base": spec.base,
                   "members": [{"name": m.name, "id": m.id, "overrides": m.overrides}
                               for m in spec.members]}
    try:
        run_id = sweep_runs.ensure_parent_run(store, spec.id, spec.name, description)
    except Exception as err:  # noqa: BLE001 - any MLflow failure stops the sweep before launch
        raise UserError(f"MLflow at {store.uri}: cannot create the sweep's parent run "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "mlflow_parent_run_id").write_text(run_id + "\n")
    print(f"MLflow parent run {run_id} (experiment {store.experiment!r}, {store.uri})",
          flush=True)
    return run_id


def _finish_parent_if_done(spec, sweep_dir: Path, store, states: dict[str, str]) -> None:
    from moe_lab.tracking import sweep_runs

    parent_file = sweep_dir / "mlflow_parent_run_id"
    if store is None or not parent_file.is_file():
        return
    if all(state == "finished" for state in states.values()):
        sweep_runs.finish_parent_run(store, parent_file.read_text().strip())
        print(f"all {len(states)} members finished", flush=True)
