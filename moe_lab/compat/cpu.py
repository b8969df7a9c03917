"""Run megatron-core on the CPU (fp32, gloo).

megatron-core assumes CUDA in a few dozen places (see ../shared/notes/megatron_cpu.md). Rather
than editing its code, this module answers those assumptions from the outside, in groups:

1. `torch.cuda` device/stream/event helpers become CPU no-ops; `current_device()` returns "cpu",
   so megatron's `device=torch.cuda.current_device()` stays valid.
2. Hard-coded `device="cuda"`, `.cuda()` and `.to("cuda")` are rewritten to the CPU by a
   `TorchFunctionMode` entered for the whole process (and re-entered inside the autograd engine,
   where modes are inactive), which also reports CPU float tensors as `torch.cuda.*Tensor` types
   for the DistributedOptimizer's type check.
3. RNG: megatron's tracker draws from the CPU generator (dropout is therefore not decorrelated
   across TP ranks; tests that compare layouts load weights from a checkpoint and use dropout 0).
4. The alltoall dispatcher's split sizes become numpy arrays on the CPU, as gloo needs.
5. gloo's all_gather needs equal shapes: uneven gathers are padded and trimmed.
6. Checkpoint saves: megatron's queue of write results is served by a `spawn`ed Manager process,
   which imports torch again to unpickle the results: ~3.5 s at every process's first save. On
   the CPU there is no CUDA context that a fork could break, so the queue is created up front
   (before gloo starts its threads) with `fork`, through megatron's own `get_write_results_queue`.

Call `enable_cpu_compat()` once, before any model is built. It is idempotent.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_ENABLED = False


def is_enabled() -> bool:
    return _ENABLED


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is how megatron names "the current GPU".
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU, for code we do not own."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # DistributedOptimizer only accepts tensors whose type starts with torch.cuda.
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        return func(*args, **kwargs)


_MODE = _CudaToCpuMode()


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: everything happens in program order on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def query(self) -> bool:
        return True

    def __getattr__(self, name):
        # record_event(), wait_stream(), synchronize(), ...: return something chainable.
        return lambda *args, **kwargs: _NoOpStream()


def _patch_cuda_runtime() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None


def _patch_autograd_engine() -> None:
    """Torch function modes are off inside backward; re-enter ours there."""
    original = torch.autograd.graph._engine_run_backward

    @functools.wraps(original)
    def run_backward(*args, **kwargs):
        with _MODE:
            return original(*args, **kwargs)

    torch.autograd.graph._engine_run_backward = run_backward
    torch.autograd._engine_run_backward = run_backward


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    # Activation recompute saves and restores the "CUDA" RNG state around the recomputed region.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_dispatcher_splits() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_all_gather() -> None:
    """gloo's all_gather_into_tensor/all_gather require equal shapes on every rank."""
    original = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if all(t.shape == tensor.shape for t in tensor_list):
            return original(tensor_list, tensor, group=group, async_op=async_op)
        # Every rank already knows every rank's size from the shapes of tensor_list.
        longest = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        original(gathered, padded, group=group)
        for out, piece in zip(tensor_list, gathered):
            out.copy_(piece[: out.shape[0]])
        return None

    dist.all_gather = all_gather


def _fork_checkpoint_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        get_write_results_queue,
    )

    get_write_results_queue("fork")  # later calls get this queue


def enable_cpu_compat() -> None:
    """Switch the process to CPU execution of megatron-core. Idempotent."""
    global _ENABLED
    if _ENABLED:
        return
    _patch_cuda_runtime()
    _MODE.__enter__()
    _patch_autograd_engine()
    _patch_rng()
    _patch_dispatcher_splits()
    _patch_uneven_all_gather()
    _fork_checkpoint_results_queue()
    _ENABLED = True
