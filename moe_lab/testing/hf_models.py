"""Tiny random Hugging Face Qwen2 / Qwen2-MoE checkpoints, built with transformers' own classes.

Weights are drawn at fan-in scale (norms near 1), so hidden states and logits are of order one
and routing is decisive: a wrong mapping shows up as a large logit difference, not one hidden
under a 0.02 initialisation. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_DENSE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                  max_position_embeddings=256, tie_word_embeddings=False)
TINY_MOE = dict(TINY_DENSE, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=48,
                decoder_sparse_step=1, norm_topk_prob=False)
# Qwen2-57B-A14B's proportions cut down: 7 query heads per KV head, an expert size (40) that does
# not divide the dense FFN (144), more experts per token, no renormalisation.
QWEN2_57B_LIKE = dict(TINY_MOE, hidden_size=112, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=144, moe_intermediate_size=40,
                      shared_expert_intermediate_size=80, num_experts_per_tok=3,
                      num_hidden_layers=3)


def tiny_model(moe: bool, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A Qwen2ForCausalLM (moe=False) or Qwen2MoeForCausalLM with order-one random weights."""
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM)

    fields = dict(TINY_MOE if moe else TINY_DENSE, **overrides)
    config_cls, model_cls = ((Qwen2MoeConfig, Qwen2MoeForCausalLM) if moe
                             else (Qwen2Config, Qwen2ForCausalLM))
    config = config_cls(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def save_tiny_model(directory: Path, moe: bool, seed: int = 0, max_shard_size: str = "50GB",
                    dtype: torch.dtype = torch.float32, **overrides):
    """Write a tiny model with save_pretrained (sharded when max_shard_size is small); returns
    the model."""
    model = tiny_model(moe, seed, dtype, **overrides)
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    return model
