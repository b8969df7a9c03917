"""Progress lines: a local sweep's per-member lines and ETA read from real metrics.jsonl files,
and `--quiet` silencing training's per-step lines while metrics.jsonl is still written.

Run: pytest tests/launch/test_progress.py
"""

from __future__ import annotations

import json

from moe_lab.launch.progress import SweepProgress, last_rows
from moe_lab.testing import run_cli

from ..conftest import TINY_MOE


def _write_rows(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sweep_progress_shows_each_running_member_and_the_sweep_eta(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_rows(a, [{"step": 10, "split": "train", "loss": 6.5, "eta_s": 90.0},
                    {"step": 10, "split": "valid", "valid/loss": 6.9},
                    {"step": 20, "split": "train", "loss": 6.1, "eta_s": 80.0,
                     "throughput/tokens_per_s": 3456.0}])
    b.mkdir()  # started, nothing logged yet
    progress = SweepProgress(total=4, max_parallel=2, interval=0)
    progress.finished(100.0)  # one member of this call took 100 s
    progress.maybe_print([("a", a, 300, 20.0), ("b", b, 300, 30.0)], waiting=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("  [a] step 20/300 | loss 6.1 | valid/loss 6.9 | tokens/s 3,456 | "
                        "eta 0:01:20")
    assert lines[1] == "  [b] starting (0:00:30 so far)"
    # The slowest running member (b: 100 - 30 = 70 s left; a: 80 s) then one more round of 100 s.
    assert lines[2] == "  sweep: 1/4 finished in this call, eta 0:03:00"


def test_progress_lines_respect_the_interval_and_quiet(tmp_path, capsys, monkeypatch):
    _write_rows(tmp_path / "a", [{"step": 5, "split": "train", "loss": 7.0, "eta_s": 5.0}])
    running = [("a", tmp_path / "a", 10, 1.0)]
    progress = SweepProgress(total=1, max_parallel=1, interval=3600)
    progress.maybe_print(running, waiting=0)
    assert capsys.readouterr().out == ""  # the first line comes one interval after the start
    monkeypatch.setenv("MOE_LAB_QUIET", "1")
    SweepProgress(total=1, max_parallel=1, interval=0).maybe_print(running, waiting=0)
    assert capsys.readouterr().out == ""


def test_last_rows_skip_a_line_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "spl')
    train, valid = last_rows(path)
    assert train["step"] == 1 and valid is None
    assert last_rows(tmp_path / "absent.jsonl") == (None, None)


def test_quiet_training_prints_no_step_lines_but_writes_metrics(tmp_path):
    args = ["train", TINY_MOE, "--run-dir", str(tmp_path / "r"), "training.max_steps=4",
            "training.log_interval=1", "optimizer.warmup_steps=0", "tracking.enabled=false",
            "checkpoint.enabled=false"]
    loud = run_cli(args[:3] + [str(tmp_path / "loud")] + args[4:])
    assert loud.returncode == 0, loud.stderr
    assert "step 4/4 | loss " in loud.stdout and "| eta 0:00:00" in loud.stdout
    quiet = run_cli([*args, "--quiet"])
    assert quiet.returncode == 0, quiet.stderr
    assert "step " not in quiet.stdout
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
