"""CPU compatibility layer for megatron-core.

Owns every adaptation that lets megatron-core's real model, dispatcher, optimizer and
checkpointing code run on the CPU under gloo. Only `moe_lab.launch` imports it, and only when
no CUDA device is present; nothing else in moe_lab may depend on it.
"""

from moe_lab.compat.cpu import enable_cpu_compat, is_enabled

__all__ = ["enable_cpu_compat", "is_enabled"]
