"""Rendering sbatch scripts from slurm/train.sbatch, in-process (no Slurm needed).

Run: pytest tests/launch/test_sbatch.py
"""

from __future__ import annotations

import pytest

from moe_lab.launch.cli import UserError
from moe_lab.launch.sbatch import DEFAULT_TEMPLATE, JobResources, Task, fill, render, \
    time_limit_seconds


def test_empty_values_drop_their_line_and_lists_repeat_it(tmp_path):
    template = tmp_path / "t.sbatch"
    template.write_text("#SBATCH --a={{a}}\n#SBATCH --b={{b}}\n  {{items}}\nplain\n")
    assert fill(template, {"a": 1, "b": None, "items": ["x", "y"]}) == \
        "#SBATCH --a=1\n  x\n  y\nplain\n"
    with pytest.raises(UserError, match=r"t.sbatch:2: unknown placeholder \{\{b\}\}"):
        fill(template, {"a": 1, "items": []})


def test_array_script_has_one_case_per_task_with_quoted_arguments(tmp_path):
    tasks = [Task(tmp_path / f"m{i}", ("cfg.yaml", "--run-dir", str(tmp_path / f"m{i}"),
                                      f"tracking.run_name=it's {i}")) for i in range(3)]
    script = render(DEFAULT_TEMPLATE, JobResources(nodes=1, gpus_per_node=0, time="10:00"),
                    tasks, job_name="s", log_file=tmp_path / "%x-%A_%a.out", workdir=tmp_path,
                    array="0-2%2")
    assert "#SBATCH --array=0-2%2" in script
    assert "#SBATCH --time=10:00" in script and "--gpus-per-node" not in script
    assert f"  2) RUN_DIR={tmp_path}/m2; TRAIN_ARGS=(cfg.yaml --run-dir {tmp_path}/m2 " \
           f"'tracking.run_name=it'\"'\"'s 2') ;;" in script
    assert "#SBATCH --signal=B:USR1@300" in script and "MOE_LAB_EXIT_TIMEOUT=270" in script


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("10:30", 630), ("04:00:00", 14400),
                                           ("1-00:00:00", 86400), ("2-3", 183600)])
def test_slurm_time_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_signal_must_come_before_the_time_limit():
    with pytest.raises(UserError, match="--signal-seconds: 300 must be between 0 and the time "
                                        "limit --time 00:04:00"):
        JobResources(nodes=1, gpus_per_node=8, time="00:04:00")
    with pytest.raises(UserError, match="--time: 'soon' is not a Slurm time"):
        JobResources(nodes=1, gpus_per_node=8, time="soon")


def test_container_flags_appear_only_when_a_container_is_asked_for(tmp_path):
    task = [Task(tmp_path / "run", ("cfg.yaml",))]
    plain = render(DEFAULT_TEMPLATE, JobResources(nodes=2, gpus_per_node=8, time="1:00:00"),
                   task, job_name="j", log_file=tmp_path / "%x-%j.out", workdir=tmp_path)
    assert "--container" not in plain.split("srun ", 1)[1].split(" &\n")[0]
    boxed = render(DEFAULT_TEMPLATE, JobResources(nodes=2, gpus_per_node=8, time="1:00:00",
                                                  container="nvcr.io#nvidia/pytorch:25.04-py3"),
                   task, job_name="j", log_file=tmp_path / "%x-%j.out", workdir=tmp_path)
    srun = boxed.split("srun ", 1)[1].split(" &\n")[0]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.04-py3" in srun
    assert f"--container-mounts={tmp_path}:{tmp_path}" in srun
    assert f"--container-workdir={tmp_path}" in srun and "  python -m moe_lab train" in srun


def test_submit_and_sweep_options_are_frozen():
    from moe_lab.launch.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    options = {name: {o for a in commands[name]._actions for o in a.option_strings}
               for name in ("submit", "sweep")}
    resources = {"--nodes", "--gpus-per-node", "--time", "--partition", "--account",
                 "--container", "--signal-seconds", "--template"}
    assert resources | {"--run-dir", "--dry-run", "--wait"} <= options["submit"]
    assert resources | {"--launcher", "--max-parallel", "--dry-run", "--sweep-dir"} <= \
        options["sweep"]
