"""megatron-core DDP, optimizer (Adam with decoupled weight decay) and LR schedule.

Without Transformer Engine or apex, megatron-core 0.19.2 steps with torch's AdamW in its
multi-tensor (foreach) form, and computes the gradient norm and clipping with per-tensor
fallbacks: `torch.norm` per gradient read back to the host one by one (a CUDA synchronisation
per tensor) and clipping as `dst.copy_(src * coeff)`. On Qwen1.5-MoE-A2.7B (4 layers, one H200,
fp32 master weights) that was ~85 ms of GPU time and ~300 synchronisations per step, more than
the forward and backward passes together. `build_optimizer` therefore switches the inner AdamW
to torch's single-kernel fused form, and `prepare_and_norm` + `fused_update` take the step
through megatron's public pieces (prepare_grads, step_with_ready_grads) with the gradient norm
in one reduction (train/grad_norm.py's kernel on CUDA, or the sums of squares the gradient hooks
left: train/grad_accumulation.py) and the clipping folded into the fused AdamW kernel (its
`grad_scale` divisor). The math is megatron's: same master weights, same norm over the same
gradients (get_grads_for_grad_norm, reduced over get_grad_stats_parallel_group), same clip
coefficient clip / (norm + 1e-6) when it is below 1. With Transformer Engine installed, megatron's
choice of TE's FusedAdam is replaced by torch's AdamW (`_use_torch_adamw`); the precision-aware
optimizer keeps TE's FusedAdam and its state, and `optimizer.update_impl=megatron` keeps
megatron's own step.
On CUDA the update itself is train/master_adamw.py's kernel (`optimizer.update_impl`), which
writes the bf16 weights in the same pass instead of megatron's copy after torch's AdamW, and
steps the precision-aware optimizer's state in its own dtypes (also with TE's int16 master
remainders, whose checkpoints hold fp32 master weights: train/master_remainders.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from moe_lab.config import ExperimentConfig
from moe_lab.train import master_adamw, master_remainders
from moe_lab.train.grad_norm import SquareSum

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def wrap_ddp(cfg: ExperimentConfig, config, model) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        # The buffers DDP accumulates and reduces into are the precision-aware optimizer's
        # main gradients.
        grad_reduce_in_fp32=cfg.optimizer.main_grads_dtype == "fp32",
        use_distributed_optimizer=cfg.optimizer.distributed,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(cfg: ExperimentConfig, config, model: DistributedDataParallel):
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.betas[0],
            adam_beta2=o.betas[1],
            adam_eps=o.eps,
            clip_grad=o.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=o.distributed,
            use_precision_aware_optimizer=o.precision_aware,
            main_grads_dtype=_DTYPES[o.main_grads_dtype],
            exp_avg_dtype=_DTYPES[o.exp_avg_dtype],
            exp_avg_sq_dtype=_DTYPES[o.exp_avg_sq_dtype],
            store_param_remainders=o.store_param_remainders,
        ),
        [model],
    )
    _exchange_fp32_masters(optimizer)
    _use_torch_adamw(optimizer, o.update_impl)
    _use_fused_adamw(optimizer)
    _use_master_kernel(optimizer, o.update_impl)
    # The pipeline schedules read these hooks from the model config.
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(cfg: ExperimentConfig, optimizer) -> OptimizerParamScheduler:
    o, steps = cfg.optimizer, cfg.training.max_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )


def _subs(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _fusable(sub) -> bool:
    inner = getattr(sub, "optimizer", None)
    if type(inner) is not torch.optim.AdamW or getattr(sub, "grad_scaler", None) is not None:
        return False
    if getattr(sub, "is_stub_optimizer", False) or sub.config.use_precision_aware_optimizer:
        return False
    params = [p for g in inner.param_groups for p in g["params"]]
    return bool(params) and all(p.dtype == torch.float32 and p.device.type in ("cuda", "cpu")
                                and p.device == params[0].device for p in params)


def _use_torch_adamw(optimizer, impl: str) -> None:
    """torch's AdamW where megatron-core built Transformer Engine's (or apex's) FusedAdam.

    megatron-core steps with TE's FusedAdam whenever TE can be imported (NGC containers), and the
    path below (one norm reduction, clipping inside the update, train/master_adamw.py's kernel,
    the next step queued early) takes torch's AdamW only: with TE installed, every run fell back
    to megatron's slower step. Both optimizers keep the same state (`exp_avg`, `exp_avg_sq` per
    parameter) and do the same AdamW math; only where the step count lives differs, and
    checkpoints save it as one number (train/optimizer_state.py). megatron replaces its inner
    optimizer over the same param groups in the same way for CPU offloading
    (DistributedOptimizer.__init__). `optimizer.update_impl=megatron` keeps megatron's choice;
    the precision-aware optimizer (bf16 state) exists only in TE's FusedAdam.
    """
    if impl == "megatron":
        return
    for sub in _subs(optimizer):
        inner = getattr(sub, "optimizer", None)
        if (inner is None or isinstance(inner, torch.optim.AdamW) or inner.state
                or sub.config.use_precision_aware_optimizer
                or not getattr(inner, "adam_w_mode", False)  # Adam with L2, or SGD: keep it
                or getattr(inner, "master_weights", False) or getattr(inner, "capturable", False)):
            continue
        hyper = {k: inner.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        sub.optimizer = torch.optim.AdamW(inner.param_groups, **hyper)


def _exchange_fp32_masters(optimizer) -> None:
    """With TE's int16 master remainders (store_param_remainders), a FusedAdam that hands
    checkpoints the fp32 master weights: megatron-core 0.19.2 cannot load the remainders back
    (train/master_remainders.py)."""
    for sub in _subs(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is not None and sub.config.use_precision_aware_optimizer:
            sub.optimizer = master_remainders.fp32_exchange_adam(inner)


def _use_fused_adamw(optimizer) -> None:
    """torch's fused AdamW kernel (one pass over params, grads and both moments) instead of
    the foreach form megatron gets when neither TE nor apex is installed."""
    subs = _subs(optimizer)
    if not all(_fusable(sub) for sub in subs):
        return
    for sub in subs:
        inner = sub.optimizer
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        inner.defaults["fused"], inner.defaults["foreach"] = True, False
        inner.register_step_pre_hook(_steps_on_param_device)
        inner.moe_lab_fused = True


def _use_master_kernel(optimizer, impl: str) -> None:
    """train/master_adamw.py's kernel for every sub-optimizer, or for none of them. The
    precision-aware optimizer's TE FusedAdam is on the fused path only through the kernel."""
    if impl == "megatron":
        return
    subs = _subs(optimizer)
    precision_aware = [sub.config.use_precision_aware_optimizer for sub in subs]
    reasons = [master_adamw.unsupported_reason(sub) for sub in subs]
    if not all(pa or getattr(sub.optimizer, "moe_lab_fused", False)
               for sub, pa in zip(subs, precision_aware)):
        reasons.append("megatron's step is not on the fused path (TE/apex Adam)")
    reasons = [r for r in reasons if r]
    if reasons:
        if impl == "triton":
            raise ValueError(f"optimizer.update_impl=triton: not possible here: {reasons[0]}")
        return
    for sub, pa in zip(subs, precision_aware):
        kernel = master_adamw.PrecisionAwareAdamW if pa else master_adamw.MasterAdamW
        sub.moe_lab_master_adamw = kernel(sub)
        sub.optimizer.moe_lab_fused = True


def _steps_on_param_device(inner, args, kwargs) -> None:
    """The fused kernel reads Adam's step counters on the parameters' device; a resumed run
    sets them as CPU tensors (train/optimizer_state.py)."""
    for param, state in inner.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device != param.device:
            state["step"] = step.to(device=param.device, dtype=torch.float32)


def fused_step_ready(optimizer) -> bool:
    return all(getattr(getattr(sub, "optimizer", None), "moe_lab_fused", False)
               for sub in _subs(optimizer))


@torch.no_grad()
def prepare_and_norm(optimizer, hook_squares=None) -> torch.Tensor | None:
    """Gradients into the main params (megatron's prepare_grads) and their global L2 norm as a
    one-element tensor on the gradients' device, without host synchronisation. None when the
    optimizer is not on the fused path: then megatron's step() does all of it.
    `hook_squares` (train/grad_accumulation.py `HookSquares`): the sums of squares the gradient
    hooks left, used when they cover exactly this step's gradients."""
    if not fused_step_ready(optimizer):
        return None
    optimizer.prepare_grads()
    subs = _subs(optimizer)
    groups = [sub.get_grad_stats_parallel_group() for sub in subs]
    shared = all(g == groups[0] for g in groups)
    squares = []
    if shared:
        grads = [g for sub in subs for g in sub.get_grads_for_grad_norm()]
        square = hook_squares.square_sum(grads) if hook_squares is not None else None
        if square is None:
            square = _square_sum(grads, subs[0])
        squares.append((square, groups[0]))
    else:
        squares += [(_square_sum(sub.get_grads_for_grad_norm(), sub), group)
                    for sub, group in zip(subs, groups)]
    total = None
    for square, group in squares:
        dist.all_reduce(square, op=dist.ReduceOp.SUM, group=group)
        total = square if total is None else total + square
    return total.sqrt()


def _square_sum(grads, sub) -> torch.Tensor:
    params = [p for g in sub.optimizer.param_groups for p in g["params"]]
    device = grads[0].device if grads else params[0].device
    if not grads:
        return torch.zeros(1, dtype=torch.float32, device=device)
    if SquareSum.applies(grads):  # one Triton launch over every gradient (CUDA)
        if not hasattr(sub, "moe_lab_square_sum"):
            sub.moe_lab_square_sum = SquareSum()
        return sub.moe_lab_square_sum(grads)
    # fp32 norms of bf16 gradients (the precision-aware optimizer's) without fp32 copies
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum().reshape(1)


@torch.no_grad()
def fused_update(optimizer, grad_norm: torch.Tensor, clip_grad: float,
                 nonfinite: torch.Tensor) -> None:
    """megatron's update with the clipping folded into the AdamW kernel (grad / grad_scale):
    train/master_adamw.py's where build_optimizer set it up, else torch's fused AdamW.
    `nonfinite` (0-d float32 on the device, 1.0 = skip) makes the kernel leave weights and
    moments alone without the host reading it; `undo_skipped_update` then rolls back the steps."""
    scale = None
    if clip_grad > 0:
        scale = torch.clamp((grad_norm + 1.0e-6) / clip_grad, min=1.0).to(torch.float32)
    subs = _subs(optimizer)
    if all(hasattr(sub, "moe_lab_master_adamw") for sub in subs):
        for sub in subs:
            sub.moe_lab_master_adamw.step(scale, nonfinite)
            _gather_params(sub)
        return
    for sub in subs:
        # torch's fused AdamW skips on found_inf and takes its step counts back itself
        sub.optimizer.grad_scale, sub.optimizer.found_inf = scale, nonfinite
    try:
        optimizer.step_with_ready_grads()
    finally:
        for sub in _subs(optimizer):
            sub.optimizer.grad_scale = sub.optimizer.found_inf = None


def undo_skipped_update(optimizer) -> None:
    """After `fused_update` skipped itself on the GPU: the master kernel's step counts (on the
    CPU) go back; torch's fused AdamW already took its own back."""
    for sub in _subs(optimizer):
        if hasattr(sub, "moe_lab_master_adamw"):
            sub.moe_lab_master_adamw.unstep()


def _gather_params(sub) -> None:
    """The rest of megatron's DistributedOptimizer.step_with_ready_grads once the master weights
    are copied: the all-gather of the updated shards over data parallel (a no-op for one rank);
    overlapped gathers start from the next forward pass instead."""
    from megatron.core.optimizer import DistributedOptimizer

    if isinstance(sub, DistributedOptimizer) and not sub.ddp_config.overlap_param_gather:
        sub.start_param_sync_for_bucket_group_subset()
