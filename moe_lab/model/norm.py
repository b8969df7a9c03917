"""RMSNorm for the local (no Transformer Engine) layer spec.

megatron-core's `WrappedTorchNorm` refuses sequence parallelism, which MoE with TP > 1 requires.
A norm's weight is replicated across TP ranks; under sequence parallelism each rank sees a slice
of the sequence, so the weight's gradients must be all-reduced over TP. Tagging the weight
`sequence_parallel=True` asks megatron's `finalize_model_grads` to do that (as apex's fused norm
and TE's norms are tagged).
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
