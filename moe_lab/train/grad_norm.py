"""The sum of squares of many gradients (for the global gradient norm) in one Triton launch.

torch's multi-tensor norm (`_foreach_norm`) reduced the precision-aware optimizer's bf16 main
gradients of Qwen1.5-MoE-A2.7B with 4 layers (2.9 billion) in 2.36 ms a step on an H200, ~2.5
TB/s (docs/performance.md). This kernel reads every gradient through a table of addresses, as
train/master_adamw.py's update does, in blocks large enough for full-bandwidth loads; each block
writes its fp32 partial sum and torch sums those (~1.4 million for 2.9 billion gradients), so
the result does not depend on scheduling. The same numbers as megatron's norm up to fp32
summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab.train.master_adamw import block_table

try:  # Triton comes with torch's CUDA wheels; absent, torch's multi-tensor norm stays
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# Elements per program and warps: the fastest of scripts/adamw_probe.py's norm rows on an H200
# (bf16 gradients: 3.1 TB/s, against 2.3 TB/s for torch's `_foreach_norm`).
BLOCK, NUM_WARPS = 2048, 2
_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class _Table:
    """One launch over same-dtype tensors: their addresses and which block each program reads."""

    addresses: torch.Tensor  # int64 [tensors]
    numels: torch.Tensor  # int64 [tensors]
    block_tensor: torch.Tensor  # int32 [programs]
    block_index: torch.Tensor  # int32 [programs]
    aligned: bool
    bf16: bool


class SquareSum:
    """sum(g * g) over a list of gradients as a one-element fp32 tensor, without a host sync.
    Keeps the launch tables of the lists it saw (they stay valid while no tensor moves)."""

    def __init__(self, block: int = BLOCK, num_warps: int = NUM_WARPS):
        self.block, self.num_warps = block, num_warps
        self.tables: dict[tuple, _Table] = {}

    @staticmethod
    def applies(grads: list[torch.Tensor]) -> bool:
        return triton is not None and bool(grads) and all(
            g.device.type == "cuda" and g.dtype in _DTYPES and g.is_contiguous() for g in grads)

    def __call__(self, grads: list[torch.Tensor]) -> torch.Tensor:
        total = None
        for dtype in _DTYPES:
            same = [g for g in grads if g.dtype == dtype and g.numel() > 0]
            if same:
                part = self._launch(same)
                total = part if total is None else total + part
        return total if total is not None else torch.zeros(1, device=grads[0].device)

    def _launch(self, grads: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(g.data_ptr() for g in grads) + tuple(g.numel() for g in grads)
        table = self.tables.get(key)
        if table is None:
            if len(self.tables) > 16:  # tensors moved (a loaded checkpoint): drop old tables
                self.tables.clear()
            table = self.tables[key] = self._table(grads)
        partials = torch.empty(table.block_tensor.numel(), dtype=torch.float32,
                               device=grads[0].device)
        _square_sum_kernel[(partials.numel(),)](
            table.block_tensor, table.block_index, table.addresses, table.numels, partials,
            BF16=table.bf16, ALIGNED=table.aligned, BLOCK=self.block, num_warps=self.num_warps)
        return partials.sum().reshape(1)

    def _table(self, grads: list[torch.Tensor]) -> _Table:
        numels = [g.numel() for g in grads]
        block_tensor, block_index = block_table(numels, self.block)
        addresses = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        device = grads[0].device
        return _Table(addresses.to(device), torch.tensor(numels).to(device),
                      block_tensor.to(device), block_index.to(device),
                      aligned=bool((addresses % 16 == 0).all()),
                      bf16=grads[0].dtype == torch.bfloat16)


if triton is not None:
    from moe_lab.train.master_adamw import program_block

    @triton.jit
    def _square_sum_kernel(block_tensor, block_index, addresses, numels, partials,
                           BF16: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        t, start, offsets, n = program_block(block_tensor, block_index, numels, BLOCK)
        address = tl.load(addresses + t)
        if ALIGNED:  # the host checked: 16-byte vector loads
            address = tl.multiple_of(address, 16)
        ptr = address.to(tl.pointer_type(tl.float32))
        if BF16:
            ptr = address.to(tl.pointer_type(tl.bfloat16))
        if start + BLOCK <= n:  # only a tensor's last block is masked (keeps vector loads)
            x = tl.load(ptr + offsets).to(tl.float32)
        else:
            x = tl.load(ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
        tl.store(partials + tl.program_id(0), tl.sum(x * x))
