"""The README's main command, as a new user runs it: `bash scripts/demo.sh` in a fresh clone.

With fewer steps than the README's run (the members' `training.max_steps` and intervals are
overridden on its command line), interrupted with Ctrl-C once the first checkpoints exist and run
again, as the README promises. CI's cached environment is reused (MOE_LAB_EDITABLE=0 keeps it
pointing at the CI checkout; the clone's code runs through PYTHONPATH, which demo.sh sets).
About two minutes on 2 cores; tests/launch/test_tutorial.py then uses the same clone.

Run: pytest tests/launch/test_first_run.py
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from ..conftest import REPO

SMALL = ["training.max_steps=40", "training.eval_interval=10", "checkpoint.interval=10",
         "optimizer.warmup_steps=5", "--progress-every", "1"]
ROUTERS = {"softmax_aux", "softmax_bias", "sinkhorn"}


def _demo(clone: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_LAB_QUIET", "PYTHONPATH")}
    env.update(MOE_LAB_EDITABLE="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen(["bash", "scripts/demo.sh", *SMALL], cwd=clone, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_readme_main_command_resumes_and_writes_a_report_of_three_routers(clone):
    readme = (REPO / "README.md").read_text()
    assert "\n    bash scripts/demo.sh\n" in readme  # the command this test runs

    first = _demo(clone)
    seen = []
    for line in first.stdout:  # Ctrl-C (SIGINT to the terminal's process group) mid-sweep
        seen.append(line)
        if re.match(r"  \[\w+\] step (1\d|2\d|3\d)/40", line):
            os.killpg(first.pid, signal.SIGINT)
            break
    rest, _ = first.communicate(timeout=300)
    first_out = "".join(seen) + rest
    assert first.returncode != 0, first_out
    assert "run the same command to resume" in first_out, first_out

    second = _demo(clone)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out
    assert "built-in corpus already prepared" in out
    member_logs = list((clone / "runs/sweeps/router_ablation_small").glob("*/train.log"))
    assert any("resumed from" in log.read_text() for log in member_logs), out
    report = clone / "compare/router_ablation_small/report.html"
    assert f"Report:   {report}" in out and "moe-lab ui" in out
    assert report.is_file() and ROUTERS <= set(re.findall(r"\w+", report.read_text()))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{clone / 'mlruns.db'}")
    parent = (clone / "runs/sweeps/router_ablation_small/mlflow_parent_run_id").read_text().strip()
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {run.info.run_name for run in children} == ROUTERS
    for run in children:
        assert run.info.status == "FINISHED"
        valid = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "valid/loss"),
                                         key=lambda m: m.step)]
        assert len(valid) == 4 and valid[-1] < valid[0], (run.info.run_name, valid)
