"""Adds each bf16 gradient into megatron's fp32 main gradient with one vectorised kernel.

megatron DDP's backward hook accumulates every parameter's bf16 gradient into its fp32
`main_grad` (a view of DDP's gradient buffer) with `main_grad.add_(grad)`. torch runs an add of
two dtypes as an unvectorised kernel: 11.1 ms a step on an H200 for Qwen1.5-MoE-A2.7B with 4
layers at micro-batch 4 (2.9 billion parameters, ~2.6 TB/s), 6.7 ms with this kernel
(docs/performance.md).

`fuse_main_grad_accumulation(ddp_model)` puts a tensor hook on each such parameter. Autograd runs
it before the gradient reaches megatron's hook; it does the same fp32 add in a Triton kernel and
sets megatron's `grad_added_to_main_grad` flag (the protocol of Transformer Engine's fused
weight-gradient accumulation), so megatron's hook only drops the bf16 gradient. The first
gradient of a step (the flag still False: megatron's `zero_grad_buffer` zeroed the buffer and
reset the flag) is written instead of added, which skips reading the zeros back; later ones
(micro-batches, recomputed regions) are added. The sums are the same fp32 values as
megatron's add of the same gradients into zeros.

bf16 main gradients (the precision-aware optimizer's `optimizer.main_grads_dtype=bf16`) are
hooked too: the add is then one dtype, which torch vectorises itself, so only the first write
changes (a copy: 4 bytes a parameter instead of the add's 6).

Since every hooked parameter's first gradient of a step is written, not added, the zeros that
megatron's `zero_grad_buffer` writes there first are never read: `zero_grad_buffer(ddp_model)`
below resets megatron's per-step state and zeroes only what the hooks do not write (parameters
without a hook, DDP's extra main gradients); a hooked parameter that got no gradient in a step
is zeroed after the backward pass, before DDP reduces the buffers. That saves a write of the
whole buffer (2 or 4 bytes a parameter) each step.
"""

from __future__ import annotations

import torch

try:  # Triton comes with torch's CUDA wheels; absent, megatron's own add stays
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK, NUM_WARPS = 1024, 4


def fuse_main_grad_accumulation(ddp_model, device_type: str = "cuda") -> list:
    """Hook every trainable bf16 parameter on `device_type` that has an fp32 or bf16 main_grad;
    returns the hooks' handles (`remove()` undoes one). `device_type="cpu"` is for tests that
    run the kernel in Triton's interpreter."""
    if triton is None or getattr(ddp_model.config, "gradient_accumulation_fusion", False):
        return []  # (with that fusion TE's GEMMs accumulate themselves and hand over dummies)
    handles, written_first = [], []
    for param in ddp_model.module.parameters():
        main = getattr(param, "main_grad", None)
        if (param.requires_grad and main is not None and param.device.type == device_type
                and param.dtype == torch.bfloat16
                and main.dtype in (torch.float32, torch.bfloat16)):
            handles.append(param.register_hook(_adder(param)))
            written_first.append(param)
    ddp_model.moe_lab_written_first = written_first
    return handles


def zero_unwritten_before_reduce(ddp_model) -> None:
    """Lets `zero_grad_buffer` skip the hooked parameters' zeros: wraps the model config's
    `finalize_model_grads_func` (megatron's schedules call it once after the last micro-batch's
    backward, before DDP reduces the gradient buffers) so that a hooked parameter that got no
    gradient this step has zeros there, not the last step's gradient. Call it after the
    optimizer set that function (train/optim.py `build_optimizer`)."""
    config = ddp_model.config
    finalize = config.finalize_model_grads_func
    if finalize is None or not getattr(ddp_model, "moe_lab_written_first", None):
        return

    def zero_unwritten_then_finalize(*args, **kwargs):
        unwritten = [p.main_grad for p in ddp_model.moe_lab_written_first
                     if not p.grad_added_to_main_grad]
        if unwritten:
            torch._foreach_zero_(unwritten)
        return finalize(*args, **kwargs)

    config.finalize_model_grads_func = zero_unwritten_then_finalize
    ddp_model.moe_lab_zeroes_unwritten = True


def zero_grad_buffer(ddp_model) -> None:
    """megatron DDP's `zero_grad_buffer` without writing the zeros the hooks overwrite: the
    same per-step resets (`grad_added_to_main_grad`, the bucket groups' state), zeros only for
    the main gradients no hook writes first. megatron's own where the hooks or the zeroing of
    unwritten parameters are not in place, or under TE's CUDA graphs (which keep the flags)."""
    written_first = getattr(ddp_model, "moe_lab_written_first", None)
    if (not written_first or not getattr(ddp_model, "moe_lab_zeroes_unwritten", False)
            or getattr(ddp_model.config, "cuda_graph_impl", "none") == "transformer_engine"):
        ddp_model.zero_grad_buffer()
        return
    for param in ddp_model.params_with_grad:
        param.grad_added_to_main_grad = False
    for bucket_group in ddp_model.bucket_groups + ddp_model.expert_parallel_bucket_groups:
        bucket_group.reset()
    hooked = {id(p) for p in written_first}
    zeros = [p.main_grad for p in ddp_model.params_with_grad if id(p) not in hooked]
    for buffer in ddp_model.buffers + ddp_model.expert_parallel_buffers:
        zeros += buffer.extra_main_grads
    if zeros:
        torch._foreach_zero_(zeros)


def _adder(param: torch.nn.Parameter):
    def add_to_main_grad(grad: torch.Tensor) -> None:
        main = param.main_grad  # read each time: megatron may rebind it
        if main.dtype == grad.dtype:  # bf16 main gradients: torch's own add, a copy first
            if param.grad_added_to_main_grad:
                main.add_(grad)
            else:
                main.copy_(grad)
        elif grad.is_contiguous() and grad.shape == param.shape and main.is_contiguous():
            accumulate(main, grad, overwrite=not param.grad_added_to_main_grad)
        else:  # a layout the flat kernel does not cover
            main.add_(grad)
        param.grad_added_to_main_grad = True

    return add_to_main_grad


def accumulate(main: torch.Tensor, grad: torch.Tensor, overwrite: bool = False) -> None:
    """main (fp32) += grad (bf16), both contiguous with the same number of elements;
    `overwrite`: main = grad (main holds zeros: the same values without reading it)."""
    n = grad.numel()
    _accumulate_kernel[(triton.cdiv(n, BLOCK),)](main, grad, n, OVERWRITE=overwrite,
                                                  BLOCK=BLOCK, num_warps=NUM_WARPS)


if triton is not None:

    @triton.jit
    def _accumulate_kernel(main_ptr, grad_ptr, n, OVERWRITE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        if not OVERWRITE:
            grad += tl.load(main_ptr + offsets, mask=mask)
        tl.store(main_ptr + offsets, grad, mask=mask)
