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

On one rank the first write also leaves each block's sum of squares (`HookSquares`): with one
micro-batch nothing changes the main gradients after the hooks, and train/optim.py takes the
gradient norm from those sums instead of reading every gradient again (2 bytes a parameter
with bf16 main gradients, 4 with fp32). bf16 main gradients are then written by the same
kernel instead of torch's copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # Triton comes with torch's CUDA wheels; absent, megatron's own add stays
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK, NUM_WARPS = 1024, 4


def fuse_main_grad_accumulation(ddp_model, device_type: str = "cuda",
                                keep_squares: bool | None = None) -> list:
    """Hook every trainable bf16 parameter on `device_type` that has an fp32 or bf16 main_grad;
    returns the hooks' handles (`remove()` undoes one). `device_type="cpu"` is for tests that
    run the kernel in Triton's interpreter. On one rank the hooks also keep the squares of
    what they write (`HookSquares`; `keep_squares`, by default on CUDA only)."""
    if triton is None or getattr(ddp_model.config, "gradient_accumulation_fusion", False):
        return []  # (with that fusion TE's GEMMs accumulate themselves and hand over dummies)
    written_first = [
        param for param in ddp_model.module.parameters()
        if (param.requires_grad and getattr(param, "main_grad", None) is not None
            and param.device.type == device_type and param.dtype == torch.bfloat16
            and param.main_grad.dtype in (torch.float32, torch.bfloat16))]
    squares = None
    if keep_squares is None:
        keep_squares = device_type == "cuda"
    if written_first and keep_squares and (not dist.is_initialized()
                                           or dist.get_world_size() == 1):
        squares = HookSquares(written_first)
    ddp_model.moe_lab_written_first = written_first
    ddp_model.moe_lab_hook_squares = squares
    return [param.register_hook(_adder(param, squares)) for param in written_first]


class HookSquares:
    """The sums of squares of what the hooks wrote, per block of BLOCK elements, one slice per
    hooked parameter. With one rank and one micro-batch each hooked parameter's main gradient is
    its one gradient of the step, written by the hook and not changed afterwards (no reduction
    over ranks), so the gradient norm can be summed from these few numbers (~2.8 million for
    2.9 billion parameters) instead of reading every gradient again."""

    def __init__(self, params: list[torch.nn.Parameter]):
        counts = [triton.cdiv(p.numel(), BLOCK) for p in params]
        self.partials = torch.zeros(sum(counts), dtype=torch.float32, device=params[0].device)
        self.slices, start = {}, 0
        for param, count in zip(params, counts):
            self.slices[id(param)] = self.partials[start:start + count]
            start += count
        self.params = params
        # True from the step's zero_grad_buffer while every hook wrote once through the kernel;
        # anything else that changes a main gradient sets it False (a second micro-batch's add,
        # another layout, a test fault).
        self.complete = False
        self._covers: dict[tuple, bool] = {}

    def square_sum(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """sum(g * g) over `grads` when they are exactly the hooked main gradients of a complete
        step (as a one-element fp32 tensor); None otherwise."""
        if not self.complete:
            return None
        key = tuple((g.data_ptr(), g.numel()) for g in grads)
        covers = self._covers.get(key)
        if covers is None:
            hooked = {(p.main_grad.data_ptr(), p.main_grad.numel()) for p in self.params}
            covers = self._covers[key] = len(key) == len(hooked) and set(key) == hooked
        return self.partials.sum().reshape(1) if covers else None


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
        unwritten = [p for p in ddp_model.moe_lab_written_first if not p.grad_added_to_main_grad]
        squares = ddp_model.moe_lab_hook_squares
        zeros = [p.main_grad for p in unwritten]
        if squares is not None:
            zeros += [squares.slices[id(p)] for p in unwritten]
        if zeros:
            torch._foreach_zero_(zeros)
        return finalize(*args, **kwargs)

    config.finalize_model_grads_func = zero_unwritten_then_finalize
    ddp_model.moe_lab_zeroes_unwritten = True


def zero_grad_buffer(ddp_model) -> None:
    """megatron DDP's `zero_grad_buffer` without writing the zeros the hooks overwrite: the
    same per-step resets (`grad_added_to_main_grad`, the bucket groups' state), zeros only for
    the main gradients no hook writes first. megatron's own where the hooks or the zeroing of
    unwritten parameters are not in place, under TE's CUDA graphs (which keep the flags), or
    where MXFP8 parameter gathers reuse the gradient buffer (it then holds weights)."""
    written_first = getattr(ddp_model, "moe_lab_written_first", None)
    if (not written_first or not getattr(ddp_model, "moe_lab_zeroes_unwritten", False)
            or getattr(ddp_model.config, "cuda_graph_impl", "none") == "transformer_engine"
            or getattr(ddp_model.ddp_config, "reuse_grad_buf_for_mxfp8_param_ag", False)):
        main_grads_changed(ddp_model)
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
    if ddp_model.moe_lab_hook_squares is not None:
        ddp_model.moe_lab_hook_squares.complete = True


def main_grads_changed(ddp_model) -> None:
    """Something other than the hooks wrote main gradients this step: their squares are stale."""
    squares = getattr(ddp_model, "moe_lab_hook_squares", None)
    if squares is not None:
        squares.complete = False


def _adder(param: torch.nn.Parameter, squares: HookSquares | None):
    def add_to_main_grad(grad: torch.Tensor) -> None:
        main = param.main_grad  # read each time: megatron may rebind it
        first = not param.grad_added_to_main_grad
        flat = grad.is_contiguous() and grad.shape == param.shape and main.is_contiguous()
        if first and flat and squares is not None:
            accumulate(main, grad, overwrite=True, squares=squares.slices[id(param)])
        else:
            if squares is not None:
                squares.complete = False
            if main.dtype == grad.dtype:  # bf16 main gradients: torch's own add, a copy first
                if first:
                    main.copy_(grad)
                else:
                    main.add_(grad)
            elif flat:
                accumulate(main, grad, overwrite=first)
            else:  # a layout the flat kernel does not cover
                main.add_(grad)
        param.grad_added_to_main_grad = True

    return add_to_main_grad


def accumulate(main: torch.Tensor, grad: torch.Tensor, overwrite: bool = False,
               squares: torch.Tensor | None = None) -> None:
    """main (fp32 or bf16) += grad (bf16), both contiguous with the same number of elements;
    `overwrite`: main = grad (main holds zeros: the same values without reading it);
    `squares` (fp32, one per BLOCK elements): each block's sum of grad * grad, written."""
    n = grad.numel()
    _accumulate_kernel[(triton.cdiv(n, BLOCK),)](
        main, grad, squares if squares is not None else main, n, OVERWRITE=overwrite,
        SQUARES=squares is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


if triton is not None:

    @triton.jit
    def _accumulate_kernel(main_ptr, grad_ptr, squares_ptr, n, OVERWRITE: tl.constexpr,
                           SQUARES: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        if SQUARES:
            tl.store(squares_ptr + tl.program_id(0), tl.sum(grad * grad))
        if not OVERWRITE:
            grad += tl.load(main_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(main_ptr + offsets, grad.to(main_ptr.dtype.element_ty), mask=mask)
