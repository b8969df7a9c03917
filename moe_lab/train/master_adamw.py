"""The fp32-master AdamW update as one Triton kernel that also writes the bf16 model weights.

megatron-core's mixed-precision step runs the inner optimizer on the fp32 master weights
(torch's fused AdamW: reads weight, gradient and both moments, writes weight and moments, 28
bytes a parameter) and then copies every master weight into the bf16 weight the model computes
with (`_copy_main_params_to_model_params`: reads the fp32 weight again, writes 2 bytes; 6 bytes).
This kernel does both in one pass over the memory (30 bytes a parameter instead of 34) and reads
each tensor through a table of addresses, so one launch covers every parameter of a param group.
On Qwen1.5-MoE-A2.7B with 4 layers (2.9 billion parameters) that traffic is ~100 GB a step, the
largest single item in a step at micro-batch 1 (docs/performance.md).

Nothing else changes: the state stays torch.optim.AdamW's (`exp_avg`, `exp_avg_sq`, `step` per
parameter, the same math as torch's fused kernel), so checkpoints, megatron's state dicts and
train/optimizer_state.py read it as before. The step counters live on the CPU, so the bias
corrections are host numbers and the update needs no synchronisation.

It replaces megatron's `step_with_ready_grads` only where that is (inner step, copy, parameter
all-gather): DistributedOptimizer and Float16OptimizerWithFloat16Params over a torch AdamW on CUDA
fp32 master weights, without FSDP or FP8/FP4 parameter gathers.
`optimizer.update_impl=megatron` keeps megatron's step; `auto` uses this kernel where it applies.

The precision-aware optimizer (`PrecisionAwareAdamW`): megatron's DistributedOptimizer hands
Transformer Engine's FusedAdam the bf16 weight shards, the main gradients as `decoupled_grad`
(bf16 or fp32) and lets it keep the fp32 master weights and the moments (bf16 or fp32) in its
state. For bf16 moments TE 2.20 copies each moment into a new fp32 tensor, steps those and
copies them back (~40 bytes a parameter more for the two, and host work per tensor). The same
kernel reads and writes TE's state where it lives, in its dtypes (20 bytes a parameter with bf16
moments and gradients), and counts the step in TE's place (`group["step"]`), so TE's state dicts
and checkpoints are unchanged. With `store_param_remainders` (megatron's default) the master
weight is the bf16 weight plus TE's int16 remainder (train/master_remainders.py): the kernel
joins the two, updates, and splits the result again (18 bytes a parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_lab.train import master_remainders

try:  # Triton comes with torch's CUDA wheels; absent, the update stays megatron's
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# Elements per program and warps: the fastest of scripts/adamw_probe.py on an H200 (4.1 TB/s,
# against 3.2 TB/s for 4096 elements with 8 warps; 2026-11-30, docs/performance.md).
BLOCK, NUM_WARPS = 1024, 4
# The same for bf16 gradients and moments (the precision-aware optimizer's 20 bytes a
# parameter): one warp on 256 elements, 3.85 TB/s against 3.35 TB/s with fp32's setting.
BF16_BLOCK, BF16_NUM_WARPS = 256, 1
# The dtypes the kernel reads gradients and moments in (and the precision-aware optimizer's
# weights are kept in).
_STATE_DTYPES = (torch.float32, torch.bfloat16)


def unsupported_reason(sub) -> str | None:
    """Why this megatron (sub-)optimizer cannot take the kernel's update; None when it can."""
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params

    if triton is None:
        return "Triton is not installed"
    if type(sub) not in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        return f"megatron's {type(sub).__name__} (fp32 training or another optimizer class)"
    inner = getattr(sub, "optimizer", None)
    cfg = sub.config
    if cfg.use_precision_aware_optimizer:
        reason = _precision_aware_reason(sub, inner)
        if reason:
            return reason
    elif type(inner) is not torch.optim.AdamW:
        return f"inner optimizer {type(inner).__name__}, not torch's AdamW"
    if sub.grad_scaler is not None or cfg.reuse_grad_buf_for_mxfp8_param_ag:
        return "a grad scaler or MXFP8 buffer reuse"
    if getattr(cfg, "overlap_param_gather_with_optimizer_step", False):
        return "overlap_param_gather_with_optimizer_step"
    ddp = getattr(sub, "ddp_config", None)
    if ddp is not None and (ddp.use_megatron_fsdp or ddp.fp8_param_gather
                            or getattr(ddp, "fp4_param_gather", False)):
        return "Megatron-FSDP or an FP8/FP4 parameter gather"
    for group in inner.param_groups:
        if group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
            return "amsgrad, maximize or differentiable AdamW"
        for p in group["params"]:
            if cfg.use_precision_aware_optimizer:
                if p.dtype not in _STATE_DTYPES or type(p) not in (torch.Tensor,
                                                                   torch.nn.Parameter):
                    return f"a {type(p).__name__} weight of {p.dtype}, not bf16 or fp32"
            elif p.dtype != torch.float32:
                return f"a master weight of {p.dtype}, not fp32"
            if p.device.type != "cuda":
                return f"a weight on {p.device}, not on CUDA"
    return None


def _precision_aware_reason(sub, inner) -> str | None:
    """Why the kernel cannot step this precision-aware optimizer's TE FusedAdam; None if it can."""
    if not any(c.__name__ == "FusedAdam" and c.__module__.startswith("transformer_engine")
               for c in type(inner).__mro__):  # TE's, or master_remainders' subclass of it
        return f"precision-aware inner optimizer {type(inner).__name__}, not TE's FusedAdam"
    if not sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return "the precision-aware optimizer with FP8 master weights"
    if not (inner.master_weights and inner.master_weight_dtype == torch.float32):
        return "TE FusedAdam without fp32 master weights"
    if inner.capturable or not inner.adam_w_mode or not inner.use_decoupled_grad:
        return "TE FusedAdam capturable, in Adam-with-L2 mode or without decoupled gradients"
    if inner.exp_avg_dtype not in _STATE_DTYPES or inner.exp_avg_sq_dtype not in _STATE_DTYPES:
        return "moments in fp16 or FP8 (only fp32 and bf16 are read here)"
    if not all(g.get("bias_correction", True) for g in inner.param_groups):
        return "Adam without bias correction"
    return None


def model_copies(sub) -> dict[int, torch.Tensor | None]:
    """id(master weight) -> the bf16 tensor megatron's copy would write it to (None: the master
    weight is the model's own fp32 weight). Same addressing as megatron's
    `_copy_main_params_to_model_params` for each optimizer class."""
    from megatron.core.optimizer import DistributedOptimizer

    copies: dict[int, torch.Tensor | None] = {}
    if isinstance(sub, DistributedOptimizer):
        pairs = zip(sub.model_float16_groups, sub.shard_fp32_from_float16_groups)
        for model_group, main_group in pairs:
            for model_param, main_param in zip(model_group, main_group):
                world = sub._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                gbuf, _, bucket = sub.model_param_gbuf_map[model_param]
                data = sub.buffers[gbuf].buckets[bucket].param_data.view(-1)
                copies[id(main_param)] = data[world.start:world.end]
        for main_group in sub.shard_fp32_groups:
            copies.update({id(p): None for p in main_group})
    else:
        for model_group, main_group in zip(sub.float16_groups, sub.fp32_from_float16_groups):
            copies.update({id(main): model.data.view(-1)
                           for model, main in zip(model_group, main_group)})
        for main_group in sub.fp32_from_fp32_groups:
            copies.update({id(p): None for p in main_group})
    return copies


@dataclass
class _Launch:
    """Device tables for one kernel launch over a list of tensors."""

    key: tuple
    # int64 [4 or 5, tensors]: fp32 master weight (or int16 remainder), gradient, exp_avg,
    # exp_avg_sq[, bf16 weight]
    addresses: torch.Tensor
    numels: torch.Tensor  # int64 [tensors]
    block_tensor: torch.Tensor  # int32 [programs]: which tensor a program works on
    block_index: torch.Tensor  # int32 [programs]: which of its blocks
    aligned: bool  # every address 16-byte aligned: vector loads
    block: int
    bf16: tuple[bool, bool, bool]  # gradient, exp_avg, exp_avg_sq in bf16 (else fp32)
    num_warps: int = NUM_WARPS
    remainders: bool = False  # the master weight is the bf16 weight + an int16 remainder


def block_table(numels: list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor, block within it) for each program when every tensor is cut into `block`s:
    lets one launch cover a list of tensors of any sizes."""
    blocks = torch.tensor([math.ceil(n / block) for n in numels])
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    block_index = torch.cat([torch.arange(b, dtype=torch.int32) for b in blocks.tolist()])
    return block_tensor, block_index


def _build_launch(key: tuple, tensors: list[list[torch.Tensor]], device,
                  block: int | None = None, num_warps: int | None = None) -> _Launch:
    """The launch tables for these tensors (by role); block and warps by default the fastest
    measured for their dtypes."""
    bf16 = tuple(tensors[role][0].dtype == torch.bfloat16 for role in (1, 2, 3))
    if block is None:
        block, num_warps = (BF16_BLOCK, BF16_NUM_WARPS) if bf16[0] else (BLOCK, NUM_WARPS)
    for role in tensors:
        for t in role:
            if not t.is_contiguous():
                raise ValueError(f"master_adamw: a non-contiguous tensor of shape {tuple(t.shape)}")
    numels = [t.numel() for t in tensors[0]]
    block_tensor, block_index = block_table(numels, block)
    addresses = torch.tensor([[t.data_ptr() for t in role] for role in tensors],
                             dtype=torch.int64)
    return _Launch(key, addresses.to(device), torch.tensor(numels).to(device),
                   block_tensor.to(device), block_index.to(device),
                   aligned=bool((addresses % 16 == 0).all()), block=block, bf16=bf16,
                   num_warps=num_warps or NUM_WARPS,
                   remainders=tensors[0][0].dtype == torch.int16)


class MasterAdamW:
    """Steps one megatron (sub-)optimizer's inner torch AdamW with the kernel."""

    def __init__(self, sub, copies: dict[int, torch.Tensor | None] | None = None):
        self.sub, self.inner = sub, sub.optimizer
        self.copies = model_copies(sub) if copies is None else copies
        self.launches: dict[tuple, _Launch] = {}
        self.stepped: list[torch.Tensor] = []  # the parameters the last step() counted

    @torch.no_grad()
    def step(self, grad_scale: torch.Tensor | None, skip: torch.Tensor | None = None) -> None:
        """One update; `skip` (0-d float32 on the device): when nonzero the kernel writes
        nothing, read on the GPU (the caller then calls `unstep`)."""
        self.stepped = []
        for index, group in enumerate(self.inner.param_groups):
            params = [p for p in group["params"] if self._grad(p) is not None]
            if not params:
                continue
            self.stepped += params
            for step, same_step in self._count_steps(group, params).items():
                chunks: dict[tuple, list[list[torch.Tensor]]] = {}
                for p in same_step:  # one launch per combination of dtypes and copy or not
                    roles = self._roles(p)
                    chunks.setdefault(tuple(t.dtype for t in roles), []).append(roles)
                for per_param in chunks.values():
                    self._launch(index, group, step, per_param, grad_scale, skip)

    def unstep(self) -> None:
        """Take back the step counts of the last step() (it skipped on the GPU)."""
        for p in self.stepped:
            self.inner.state[p]["step"] -= 1
        self.stepped = []

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return p.grad

    def _roles(self, p: torch.Tensor) -> list[torch.Tensor]:
        """The tensors the kernel reads and writes for p: master weight, gradient, exp_avg,
        exp_avg_sq, and the bf16 weight it writes when there is one."""
        state = self.inner.state[p]
        copy = self.copies.get(id(p))
        return [p, p.grad, state["exp_avg"], state["exp_avg_sq"]] + ([copy] if copy is not None
                                                                     else [])

    def _count_steps(self, group, params) -> dict[float, list[torch.Tensor]]:
        by_step: dict[float, list[torch.Tensor]] = {}
        for p in params:
            by_step.setdefault(self._count_step(p), []).append(p)
        return by_step

    def _count_step(self, p: torch.Tensor) -> float:
        """Adam's state for p (created as torch's AdamW would), its step counted on the CPU."""
        state = self.inner.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device.type != "cpu":  # from torch's fused step: once, then on the CPU
            state["step"] = state["step"].to("cpu", torch.float32)
        state["step"] += 1
        return float(state["step"])

    def _launch(self, index, group, step, per_param, grad_scale, skip) -> None:
        """One kernel launch over the tensors `_roles` gave for each parameter of a chunk."""
        roles = [list(role) for role in zip(*per_param)]
        # The tables stay valid while no tensor moves (a loaded checkpoint may replace them).
        key = tuple(t.data_ptr() for role in roles for t in role)
        slot = (index, id(roles[0][0]), len(roles))
        launch = self.launches.get(slot)
        if launch is None or launch.key != key:
            launch = _build_launch(key, roles, roles[0][0].device)
            self.launches[slot] = launch
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        update(launch, grad_scale, skip, lr=lr, weight_decay=float(group["weight_decay"]),
               beta1=beta1, beta2=beta2, eps=group["eps"],
               step_size=lr / (1 - beta1 ** step), bc2_sqrt=math.sqrt(1 - beta2 ** step))


class PrecisionAwareAdamW(MasterAdamW):
    """Steps the precision-aware optimizer's TE FusedAdam with the kernel, on TE's own state:
    `master_param` (fp32, or the int16 remainders) for a bf16 weight, which the kernel then
    writes; an fp32 weight is its own master. Gradients are megatron's `decoupled_grad`, the step
    count TE's `group["step"]`."""

    def __init__(self, sub):
        super().__init__(sub, copies={})  # the bf16 weight is the optimizer's own parameter
        self.stepped_groups: list[dict] = []

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return getattr(p, "decoupled_grad", None)

    def _roles(self, p: torch.Tensor) -> list[torch.Tensor]:
        state = self.inner.state[p]
        master = state["master_param"] if p.dtype == torch.bfloat16 else p
        return [master, p.decoupled_grad, state["exp_avg"], state["exp_avg_sq"]] + (
            [p] if p.dtype == torch.bfloat16 else [])

    def _count_steps(self, group, params) -> dict[float, list[torch.Tensor]]:
        for p in params:
            if not self.inner.state[p]:  # as TE's step creates it (master from the weight)
                self.inner.initialize_state(p, master_remainders.keeps_remainders(self.inner, p))
        group["step"] = group.get("step", 0) + 1  # TE counts per param group, on the host
        self.stepped_groups.append(group)
        return {float(group["step"]): params}

    def step(self, grad_scale, skip=None) -> None:
        self.stepped_groups = []
        super().step(grad_scale, skip)

    def unstep(self) -> None:
        for group in self.stepped_groups:
            group["step"] -= 1
        self.stepped_groups, self.stepped = [], []


def update(launch: _Launch, grad_scale, skip=None, *, lr, weight_decay, beta1, beta2, eps,
           step_size, bc2_sqrt, num_warps: int | None = None) -> None:
    n_tensors = launch.addresses.shape[1]
    unread = launch.numels  # a placeholder pointer: without HAS_SCALE / HAS_SKIP it is not read
    g_bf16, m_bf16, v_bf16 = launch.bf16
    if launch.remainders and launch.addresses.shape[0] != 5:
        raise ValueError("master_adamw: remainders without the bf16 weights they complete")
    _adamw_kernel[(launch.block_tensor.numel(),)](
        launch.block_tensor, launch.block_index, launch.addresses, launch.numels, n_tensors,
        grad_scale if grad_scale is not None else unread, skip if skip is not None else unread,
        lr * weight_decay, beta1, beta2, eps, step_size, bc2_sqrt,
        HAS_SCALE=grad_scale is not None, HAS_SKIP=skip is not None,
        HAS_COPY=launch.addresses.shape[0] == 5, G_BF16=g_bf16, M_BF16=m_bf16, V_BF16=v_bf16,
        REMAINDERS=launch.remainders, ALIGNED=launch.aligned, BLOCK=launch.block,
        num_warps=num_warps or launch.num_warps)


if triton is not None:

    @triton.jit
    def program_block(block_tensor, block_index, numels, BLOCK: tl.constexpr):
        """This program's place in `block_table`'s tables: (tensor, first element, the
        block's element offsets, the tensor's number of elements)."""
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = tl.load(block_index + pid).to(tl.int64) * BLOCK
        return t, start, start + tl.arange(0, BLOCK), tl.load(numels + t)

    @triton.jit
    def _address(addresses, role, n_tensors, t, dtype, ALIGNED: tl.constexpr):
        address = tl.load(addresses + role * n_tensors + t)
        if ALIGNED:  # the host checked: lets Triton use 16-byte vector loads
            address = tl.multiple_of(address, 16)
        return address.to(tl.pointer_type(dtype))

    @triton.jit
    def _store(ptr, offsets, x, mask, BF16: tl.constexpr):
        if BF16:
            tl.store(ptr + offsets, x.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)
        else:
            tl.store(ptr + offsets, x, mask=mask)

    @triton.jit
    def _join(remainder, weight):
        """fp32 master weights of int16 remainders and bf16 weights (as int16 bits), as
        train/master_remainders.py's `join`."""
        remainder = remainder.to(tl.int32)
        high = weight.to(tl.int32) - (remainder < 0).to(tl.int32)
        return ((high << 16) | (remainder & 0xFFFF)).to(tl.float32, bitcast=True)

    @triton.jit
    def _store_split(rem_ptr, weight_ptr, offsets, p, mask):
        """Stores fp32 master weights as int16 remainders and bf16 weights (int16 bits), as
        train/master_remainders.py's `split`."""
        bits = p.to(tl.int32, bitcast=True)
        low = bits & 0xFFFF
        up = (low >= 0x8000).to(tl.int32)
        tl.store(rem_ptr + offsets, (low - (up << 16)).to(tl.int16), mask=mask)
        tl.store(weight_ptr + offsets, ((bits >> 16) + up).to(tl.int16), mask=mask)

    @triton.jit
    def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, offsets, n, grad_scale, lr_decay,
                     beta1, beta2, eps, step_size, bc2_sqrt, MASKED: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_COPY: tl.constexpr, M_BF16: tl.constexpr,
                     V_BF16: tl.constexpr, REMAINDERS: tl.constexpr):
        mask = offsets < n if MASKED else None
        if REMAINDERS:  # p_ptr: int16 remainders; out_ptr: the bf16 weights' bits
            p = _join(tl.load(p_ptr + offsets, mask=mask), tl.load(out_ptr + offsets, mask=mask))
        else:
            p = tl.load(p_ptr + offsets, mask=mask)
        g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
        if HAS_SCALE:  # gradient clipping: torch's fused AdamW divides by grad_scale
            g = g / tl.load(grad_scale)
        # torch's fused AdamW, term for term (aten/src/ATen/native/cuda/fused_adam_utils.cuh)
        p = p - lr_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        if REMAINDERS:
            _store_split(p_ptr, out_ptr, offsets, p, mask)
        else:
            tl.store(p_ptr + offsets, p, mask=mask)
        _store(m_ptr, offsets, m, mask, M_BF16)
        _store(v_ptr, offsets, v, mask, V_BF16)
        if HAS_COPY and not REMAINDERS:
            _store(out_ptr, offsets, p, mask, True)

    @triton.jit
    def _adamw_kernel(block_tensor, block_index, addresses, numels, n_tensors, grad_scale, skip,
                      lr_decay, beta1, beta2, eps, step_size, bc2_sqrt,
                      HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_COPY: tl.constexpr,
                      G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
                      REMAINDERS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        t, start, offsets, n = program_block(block_tensor, block_index, numels, BLOCK)
        if HAS_SKIP:  # a NaN/Inf loss or gradient norm: an empty tensor, every access masked
            n = tl.where(tl.load(skip) != 0, 0, n)
        p_ptr = _address(addresses, 0, n_tensors, t, tl.float32, ALIGNED)
        if REMAINDERS:
            p_ptr = _address(addresses, 0, n_tensors, t, tl.int16, ALIGNED)
        # gradients and moments in fp32, or in bf16 (the precision-aware optimizer)
        g_ptr = _address(addresses, 1, n_tensors, t, tl.float32, ALIGNED)
        if G_BF16:
            g_ptr = _address(addresses, 1, n_tensors, t, tl.bfloat16, ALIGNED)
        m_ptr = _address(addresses, 2, n_tensors, t, tl.float32, ALIGNED)
        if M_BF16:
            m_ptr = _address(addresses, 2, n_tensors, t, tl.bfloat16, ALIGNED)
        v_ptr = _address(addresses, 3, n_tensors, t, tl.float32, ALIGNED)
        if V_BF16:
            v_ptr = _address(addresses, 3, n_tensors, t, tl.bfloat16, ALIGNED)
        out_ptr = p_ptr  # unused without HAS_COPY
        if HAS_COPY:
            out_ptr = _address(addresses, 4, n_tensors, t, tl.bfloat16, ALIGNED)
        if REMAINDERS:  # read and written as bits
            out_ptr = _address(addresses, 4, n_tensors, t, tl.int16, ALIGNED)
        # Only a tensor's last block is masked: an unknown bound would stop vector loads.
        if start + BLOCK <= n:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, offsets, n, grad_scale, lr_decay,
                         beta1, beta2, eps, step_size, bc2_sqrt, False, HAS_SCALE, HAS_COPY,
                         M_BF16, V_BF16, REMAINDERS)
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, offsets, n, grad_scale, lr_decay,
                         beta1, beta2, eps, step_size, bc2_sqrt, True, HAS_SCALE, HAS_COPY,
                         M_BF16, V_BF16, REMAINDERS)
