"""Run `moe-lab` as a process that may be killed, and clean up after it as a node failure would.

A SIGKILLed training process leaves behind the multiprocessing helpers that megatron's checkpoint
writer started (a spawn-context Manager for its write results, a resource tracker). They would
keep the output pipes open and live on; a failed node takes them down with it. So the process
runs in its own session with its output in files, and when it has ended, whatever is left of its
session is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from moe_lab.testing.distributed import REPO, child_env


def run_cli_crashable(args: list[str], env: dict | None = None, timeout: float = 300,
                      cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m moe_lab ARGS`; returncode is -9 when it was killed with SIGKILL."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "moe_lab", *args], cwd=cwd or REPO,
                                env=child_env(env), stdout=out, stderr=err, text=True,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            _kill_session(proc.pid)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, returncode, out.read(), err.read())


def _kill_session(session_leader: int) -> None:
    try:
        os.killpg(session_leader, signal.SIGKILL)
    except ProcessLookupError:  # nothing left
        pass
