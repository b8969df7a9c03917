"""Causal self-attention through torch's scaled_dot_product_attention (flash / memory-efficient
kernels on GPUs), for the `torch` backend: megatron's local DotProductAttention materialises the
[batch, heads, seq, seq] score matrix, TE's fused attention needs Transformer Engine.

Implements megatron's core-attention slot: forward(query, key, value, attention_mask, ...) with
query [s, b, heads, d] and key/value [s, b, kv_heads, d]; returns [s, b, heads * d].

`config.attention_backend` (model.attention_backend) picks torch's kernel on the GPU. On an H200
torch itself takes cuDNN's fused attention, 1.8x faster than FlashAttention-2 at the bench
shapes (scripts/sdpa_probe.py), but falls back to flash where its cuDNN version check fails, as
it does next to a Transformer Engine that loaded another cuDNN (docs/performance.md); an explicit
request still runs cuDNN's kernel. So `auto` asks for cuDNN first, then torch's order.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_KERNELS = {
    AttnBackend.auto: [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                       SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    AttnBackend.flash: [SDPBackend.FLASH_ATTENTION],
    AttnBackend.fused: [SDPBackend.CUDNN_ATTENTION],
    AttnBackend.unfused: [SDPBackend.MATH],
}


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type=None,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("model.backend=torch has no context-parallel attention; use te")
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kernels = SDPA_KERNELS[config.attention_backend]

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias need the te backend")
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        kwargs = dict(is_causal=True, scale=self.softmax_scale,
                      dropout_p=self.dropout if self.training else 0.0,
                      enable_gqa=k.shape[1] != q.shape[1])
        if q.is_cuda:
            with sdpa_kernel(self.kernels, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:  # the CPU keeps torch's choice
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
