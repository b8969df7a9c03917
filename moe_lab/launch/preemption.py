"""Preemption: SIGUSR1/SIGTERM become "save a checkpoint at the end of this step and exit 75".

Slurm sends SIGUSR1 before a job's time limit (`--signal=B:USR1@N`, forwarded by the batch
script) and SIGTERM when it preempts or requeues a job. `install()` turns either into a flag that
the training loop polls once per step through `PreemptionWatch.should_stop`; all ranks agree on it
with one all-reduce, so they stop after the same step and save the same checkpoint. The process
then exits with EXIT_PREEMPTED, which the sbatch script answers with `scontrol requeue`.

If the process has not exited `exit_timeout` seconds after the first signal (a hung collective,
a save stuck on a dead filesystem), a watchdog thread ends it with EXIT_FORCED; the previous
checkpoint is intact, so requeueing still resumes. The watchdog is armed from a thread woken by
the signal's wakeup fd, because a main thread blocked inside C code never runs Python handlers.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

EXIT_PREEMPTED = 75  # checkpoint saved after a signal: requeue me (sysexits' EX_TEMPFAIL)
EXIT_FORCED = 76  # still running exit_timeout s after a signal: killed; resume from the last save
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
DEFAULT_EXIT_TIMEOUT = 300.0


class PreemptionWatch:
    """Remembers the first SIGUSR1/SIGTERM; `should_stop()` is the loop's per-step question."""

    def __init__(self, exit_timeout: float):
        self.exit_timeout = exit_timeout
        self.received: int | None = None  # the first signal's number
        self.stopping = False
        self._watchdog: threading.Timer | None = None
        # Re-entrant: the Python-level handler runs in the main thread, possibly while the main
        # thread holds the lock in arm_watchdog().
        self._lock = threading.RLock()
        self._wakeup_sockets: tuple = ()
        self._rank = 0

    def should_stop(self) -> bool:
        """True on every rank once any rank has received a signal. Called by all ranks together."""
        if not self.stopping:
            self.stopping, self._rank = _any_rank(self.received is not None)
            if self.stopping:
                self.arm_watchdog()
                # From here on a signal must not kill the process: under `srun
                # --kill-on-bad-exit` the first rank to exit 75 makes srun SIGTERM the others,
                # which may still be tearing down. SIG_IGN also survives interpreter shutdown.
                for signum in SIGNALS:
                    signal.signal(signum, signal.SIG_IGN)
        return self.stopping

    def exit_code(self, step: int, max_steps: int) -> int:
        """EXIT_PREEMPTED when a signal stopped training before max_steps, else 0."""
        if self.stopping and step < max_steps:
            if self._rank == 0:
                print(f"stopped at step {step}/{max_steps} after a signal, checkpoint saved: "
                      f"exit {EXIT_PREEMPTED} (under Slurm the job requeues itself; elsewhere "
                      f"run the same command to resume)", flush=True)
            return EXIT_PREEMPTED
        return 0

    def notice(self, signum: int) -> None:
        """Called from the wakeup thread (any time) and the Python handler (between bytecodes)."""
        with self._lock:
            if self.received is None:
                self.received = signum
                print(f"received {signal.Signals(signum).name}: saving a checkpoint after this "
                      f"step, then exiting {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        self.arm_watchdog()

    def arm_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is None:
                self._watchdog = threading.Timer(self.exit_timeout, _force_exit,
                                                 args=(self.exit_timeout,))
                self._watchdog.daemon = True
                self._watchdog.start()


def install(exit_timeout: float | None = None) -> PreemptionWatch:
    """Catch SIGUSR1 and SIGTERM in this (main) thread; return the watch the loop polls.

    exit_timeout defaults to MOE_LAB_EXIT_TIMEOUT (seconds; the sbatch template sets it a little
    below the signal's lead time), else DEFAULT_EXIT_TIMEOUT.
    """
    if exit_timeout is None:
        exit_timeout = float(os.environ.get("MOE_LAB_EXIT_TIMEOUT", DEFAULT_EXIT_TIMEOUT))
    watch = PreemptionWatch(exit_timeout)
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: watch.notice(signum))
    # The C-level handler writes the signal number to this socket even while the main thread is
    # stuck in C; a daemon thread reads it and arms the watchdog.
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watch._wakeup_sockets = (reader, writer)  # keep them open for the process's lifetime
    threading.Thread(target=_wake_on_signal, args=(reader, watch), daemon=True,
                     name="preemption-wakeup").start()
    return watch


def _wake_on_signal(reader: socket.socket, watch: PreemptionWatch) -> None:
    while True:
        data = reader.recv(64)
        if not data:
            return
        for signum in data:
            if signum in SIGNALS:
                watch.notice(signum)


def _any_rank(flag: bool) -> tuple[bool, int]:
    """(flag on any rank, this rank): one tiny all-reduce, called by all ranks together."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag, 0
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item()), dist.get_rank()


def _force_exit(timeout: float) -> None:
    print(f"still running {timeout:.0f} s after the preemption signal (hung collective or "
          f"save?): exiting {EXIT_FORCED}; the last complete checkpoint is kept",
          file=sys.stderr, flush=True)
    os._exit(EXIT_FORCED)
