"""Preemption's watchdog: a process still running after the signal's grace period (a hung
collective) ends with 76, even while its main thread is stuck inside gloo's C++ code.
(Saving after a signal and exiting 75 is tested through Slurm in tests/slurm/test_jobs.py.)

Run: pytest tests/launch/test_preemption.py
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from moe_lab.launch.preemption import EXIT_FORCED
from moe_lab.testing.distributed import REPO, child_env, free_port

HUNG_RANK = """
import datetime, sys, time
import torch, torch.distributed as dist
from moe_lab.launch import preemption
rank, port = int(sys.argv[1]), sys.argv[2]
preemption.install(exit_timeout=2)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=300))
if rank == 0:
    print("entering all_reduce", flush=True)
    dist.all_reduce(torch.ones(1))  # rank 1 never joins: stuck in gloo's C++ wait
else:
    time.sleep(300)
"""


def test_watchdog_ends_a_rank_stuck_in_a_collective_with_76():
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", HUNG_RANK, str(rank), port], cwd=REPO,
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    try:
        assert "entering all_reduce" in ranks[0].stdout.readline()
        time.sleep(0.5)  # inside the all_reduce now
        ranks[0].send_signal(signal.SIGUSR1)
        started = time.monotonic()
        ranks[0].wait(timeout=60)
        waited = time.monotonic() - started
        output = ranks[0].stdout.read()
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode == EXIT_FORCED, output
    assert "still running 2 s after the preemption signal" in output
    assert waited >= 1.5  # the 2 s grace, not an immediate death by the signal

