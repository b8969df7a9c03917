"""The training run: build, resume or initialise, step, log, checkpoint.

Linear build chain: TransformerConfig -> model -> DDP -> optimizer -> scheduler -> data ->
Trainer. Runs on every rank; only global rank 0 writes metrics.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moe_lab.config import ExperimentConfig, derive
from moe_lab.data import build_data_source
from moe_lab.model import build_model, build_transformer_config
from moe_lab.train.checkpoint import Checkpointer, TrainState, load_checkpoint
from moe_lab.train.evaluate import log_validation, validation_due
from moe_lab.train.faults import Fault, FaultInjector
from moe_lab.train.grad_accumulation import (fuse_main_grad_accumulation,
                                              zero_unwritten_before_reduce)
from moe_lab.train.guard import NonFiniteError
from moe_lab.train.optim import build_optimizer, build_scheduler, wrap_ddp
from moe_lab.train.resume import broadcast_resume, weights_source
from moe_lab.train.step import Trainer


def train(cfg: ExperimentConfig, run_dir: Path, sinks: list, use_gpu: bool,
          stop_at_step: int | None = None, fault: Fault | None = None,
          stop_requested=None) -> TrainState:
    """Train until training.max_steps (or stop_at_step, saving there). Returns the final state.

    stop_requested: called by every rank after each step; True saves and returns early
    (preemption, see launch/preemption.py). `fault` is for tests only (train/faults.py)."""
    t = cfg.training
    config, model, optimizer, scheduler = build_training(cfg, use_gpu)
    faults = FaultInjector(fault, config)

    state = _restore(cfg, run_dir, model, optimizer, scheduler)
    checkpointer = Checkpointer(cfg, run_dir, model, optimizer, scheduler, on_event=faults.at)
    for sink in sinks:
        if hasattr(sink, "start"):
            sink.start(state.step)

    data = build_data_source(cfg, run_dir / "data_cache")
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    flops_per_token = derive(cfg).flops_per_token
    last = min(t.max_steps, stop_at_step or t.max_steps)
    started = step_start = time.perf_counter()
    steps_timed = 0

    next_batches = None
    while state.step < last:
        if next_batches is None:
            batches = data.batches(state.step, dp_rank, dp_size)
        else:  # fetched last step, whose call to trainer.step queued them already
            batches, next_batches = next_batches, None
        if _may_look_ahead(cfg, state.step + 1, last):
            next_batches = data.batches(state.step + 1, dp_rank, dp_size)
        faults.at("step_begin")
        try:
            metrics = trainer.step(state.step, batches, next_batches)
        except NonFiniteError:
            if cfg.checkpoint.enabled:
                checkpointer.save_last_good(state)  # the bad update was not applied
            raise
        faults.at("step_end")
        # No synchronisation here (as in Megatron-LM): the GPU runs this step's optimizer and
        # usually the next step's forward and backward (queued by trainer.step) while the host
        # logs. Every step reads its loss and gradient norm, so the time from one step's end to
        # the next one's is the step time, logging and data included; validation and
        # checkpoints are left out below.
        step_end = time.perf_counter()
        step_time, step_start = step_end - step_start, step_end
        state.step += 1
        state.consumed_samples += t.global_batch_size
        steps_timed += 1
        metrics.update(_throughput(cfg, step_time, flops_per_token, use_gpu))
        metrics["eta_s"] = (time.perf_counter() - started) / steps_timed * (last - state.step)
        if state.step % t.log_interval == 0 or state.step == last:
            for sink in sinks:
                sink.log(state.step, metrics)
            _log_expert_load(sinks, state.step, trainer.expert_load)
        validated = log_validation(cfg, model, data, state.step, sinks) is not None
        stop = stop_requested is not None and stop_requested()
        saved = _checkpoint_due(cfg, state.step, last) or (cfg.checkpoint.enabled and stop)
        if saved:
            checkpointer.save(state)
        checkpointer.poll()
        if validated or saved:
            step_start = time.perf_counter()
        if stop:
            break
    checkpointer.close()
    return state


def _checkpoint_due(cfg: ExperimentConfig, done: int, last: int) -> bool:
    """A checkpoint after `done` steps: every checkpoint.interval, and at the last step."""
    interval = cfg.checkpoint.interval
    return cfg.checkpoint.enabled and ((bool(interval) and done % interval == 0) or done == last)


def _may_look_ahead(cfg: ExperimentConfig, done: int, last: int) -> bool:
    """Whether the step that makes `done` steps may queue the next step's forward and backward
    before its numbers are read (Trainer.step): not before the last step, a checkpoint or a
    validation, which must see the model between two steps with nothing of the next queued."""
    return done < last and not _checkpoint_due(cfg, done, last) and not validation_due(cfg, done)


def build_training(cfg: ExperimentConfig, use_gpu: bool):
    """Seeded build chain: TransformerConfig -> GPTModel -> DDP (+ the fused main-gradient
    accumulation) -> optimizer (+ the unwritten main gradients zeroed before DDP's reduction,
    so that the step's zeroing can skip the rest) -> LR schedule."""
    torch.manual_seed(cfg.training.seed)
    if use_gpu:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg.training.seed)
    config = build_transformer_config(cfg, use_cpu_initialization=not use_gpu)
    model = build_model(cfg, config)
    if use_gpu:
        model.cuda()
    model = wrap_ddp(cfg, config, model)
    fuse_main_grad_accumulation(model)  # CUDA parameters only
    optimizer = build_optimizer(cfg, config, model)
    zero_unwritten_before_reduce(model)
    return config, model, optimizer, build_scheduler(cfg, optimizer)


def _log_expert_load(sinks, step: int, load) -> None:
    """The layer x expert token counts, to the sinks that keep them (MLflow: .npy + heatmap)."""
    if load is None:
        return
    for sink in sinks:
        if hasattr(sink, "log_expert_load"):
            sink.log_expert_load(step, load)


def _restore(cfg, run_dir, model, optimizer, scheduler) -> TrainState:
    """Resume the run in run_dir, or start from checkpoint.init_from's weights, or fresh."""
    resume = broadcast_resume(run_dir, cfg)
    for path, reason in resume.skipped:
        _say(f"warning: skipping checkpoint {path.name}: {reason}")
    if resume.path is not None:
        state = load_checkpoint(resume.path, model, optimizer, scheduler)
        _say(f"resumed from {resume.path} at step {state.step}")
        return state
    if cfg.checkpoint.init_from:
        source = weights_source(Path(cfg.checkpoint.init_from))
        load_checkpoint(source, model)
        _say(f"initialised weights from {source}")
    return TrainState()


def _throughput(cfg, step_time: float, flops_per_token: float, use_gpu: bool) -> dict:
    tokens_per_s = cfg.training.global_batch_size * cfg.training.seq_length / step_time
    tflops = tokens_per_s * flops_per_token / dist.get_world_size() / 1e12
    metrics = {"throughput/tokens_per_s": tokens_per_s, "throughput/tflops": tflops,
               "step_time_s": step_time}
    if use_gpu:
        metrics["throughput/mfu"] = tflops / cfg.training.peak_tflops
        metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        # ru_maxrss is KiB on Linux: the process's peak resident memory.
        metrics["memory/peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)
