"""docs/tutorial.md, run as written: every `.venv/bin/moe-lab` command of its bash blocks, in order,
in a fresh clone of the repository, with fewer steps appended to `train` and `sweep`.
`moe-lab ui` (a server that runs until Ctrl-C) is left out; it has its own tests.

Run: pytest tests/launch/test_tutorial.py
"""

from __future__ import annotations

import re

from moe_lab.testing import run_cli

from ..conftest import REPO

FEWER_STEPS = ["training.max_steps=20", "training.eval_interval=10", "checkpoint.interval=10",
               "optimizer.warmup_steps=5"]


def tutorial_commands() -> list[list[str]]:
    text = (REPO / "docs" / "tutorial.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith(".venv/bin/moe-lab "):
                commands.append(command.split()[1:])
    return commands


def test_the_tutorial_commands_run_and_compare_four_members(clone):
    commands = tutorial_commands()
    assert [c[0] for c in commands] == ["data", "train", "upcycle", "sweep", "compare", "ui"]
    for args in commands[:-1]:
        extra = FEWER_STEPS if args[0] in ("train", "sweep") else []
        result = run_cli([*args, *extra], cwd=clone, timeout=900)
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
    table = [line for line in result.stdout.splitlines() if "FINISHED" in line]
    assert len(table) == 4 and all("| 20 |" in line for line in table), result.stdout
    assert (clone / "compare" / "upcycled_router_ablation" / "report.html").is_file()
    members = clone / "runs" / "sweeps" / "upcycled_router_ablation"
    started_from = {log.parent.name.rsplit("-", 1)[0]: "initialised weights from" in
                    log.read_text() for log in members.glob("*/train.log")}
    assert started_from == {"scratch_softmax_aux": False, "upcycled_softmax_aux": True,
                            "upcycled_softmax_bias": True, "upcycled_sinkhorn": True}
