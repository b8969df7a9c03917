"""Step time of a training-step function two ways, GPU kernel time and host (CPU thread) time.

`steady_ms` is what training gets: steps back to back, one synchronisation at the end, so the
host may queue the next step while the GPU finishes the last (as `moe-lab train` and transformers'
loops do). `wall_ms` times each step alone, synchronised at both ends: every step starts on an
idle GPU, which exposes the host's time to issue the forward. steady < wall means the host, not
the GPU, limits the isolated step."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class StepTiming:
    wall_ms: float  # median wall time of a step, synchronised at both ends
    gpu_ms: float  # GPU kernel time per step (profiler); nan on the CPU
    host_ms: float  # CPU time of the Python thread per step (includes time spent in CUDA syncs)
    peak_gb: float  # peak GPU memory allocated; 0 on the CPU
    steady_ms: float = float("nan")  # mean step time of `steps` steps back to back (nan: older
                                     # JSON files, written before it was measured)


def measure(step: Callable[[], None], warmup: int = 3, steps: int = 8,
            profiled_steps: int = 2) -> StepTiming:
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        step()
    _sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    walls, hosts = [], []
    for _ in range(steps):
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        step()
        _sync(cuda)
        walls.append(time.perf_counter() - start_wall)
        hosts.append(time.thread_time() - start_cpu)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(cuda)
    steady_ms = (time.perf_counter() - start) / steps * 1e3
    gpu_ms = _kernel_time_ms(step, profiled_steps) if cuda else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return StepTiming(statistics.median(walls) * 1e3, gpu_ms, statistics.median(hosts) * 1e3,
                      peak, steady_ms)


def _kernel_time_ms(step, steps: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / steps / 1e3


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def cuda_event_ms(fn: Callable[[], None], repeat: int = 10) -> float:
    """Mean GPU time of `fn` over `repeat` calls back to back (CUDA events; one warm-up call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat
