"""transformers' Qwen2MoeForCausalLM built from a moe-lab config: the baselines.

Variants (issue 11's terms):
- `hf_eager`: per-expert Python loop, bf16 parameters and optimizer state ("pure bf16");
- `hf_grouped_bf16`: experts_implementation="grouped_mm", pure bf16 (transformers' fastest);
- `hf_grouped_fp32`: grouped_mm with fp32 parameters and bf16 autocast (HF Trainer's bf16, the
  numerics class of megatron-core's mixed precision with fp32 master weights).
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

VARIANTS = {
    "hf_eager": ("eager", torch.bfloat16, False),
    "hf_grouped_bf16": ("grouped_mm", torch.bfloat16, False),
    "hf_grouped_fp32": ("grouped_mm", torch.float32, True),
}


def hf_config(cfg, experts_implementation: str = "eager"):
    from transformers import Qwen2MoeConfig

    m, moe = cfg.model, cfg.moe
    pattern = moe.moe_layers(m.num_layers)
    return Qwen2MoeConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.kv_heads,
        rope_theta=m.rope_base, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        max_position_embeddings=cfg.training.seq_length, num_experts=moe.num_experts,
        num_experts_per_tok=moe.topk, moe_intermediate_size=moe.expert_ffn,
        shared_expert_intermediate_size=moe.shared_expert_ffn,
        norm_topk_prob=bool(moe.router.get("norm_topk_prob", False)), decoder_sparse_step=1,
        mlp_only_layers=[i for i, is_moe in enumerate(pattern) if not is_moe],
        router_aux_loss_coef=moe.balance.aux, output_router_logits=False,
        attention_dropout=0.0, initializer_range=m.init_std,
        attn_implementation="sdpa", experts_implementation=experts_implementation)


def build_step(cfg, variant: str, device):
    """A closure that runs one fwd+bwd+AdamW step on one micro-batch of random tokens."""
    from transformers import Qwen2MoeForCausalLM

    experts, dtype, autocast = VARIANTS[variant]
    config = hf_config(cfg, experts)
    model = Qwen2MoeForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr,
                                  betas=tuple(cfg.optimizer.betas),
                                  weight_decay=cfg.optimizer.weight_decay, fused=fused)
    tokens = _tokens(cfg, device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast
           else contextlib.nullcontext())

    def step():
        with record_function("phase:forward_backward"):
            with amp:
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
        with record_function("phase:optimizer"):
            optimizer.step()
        with record_function("phase:zero_grad"):
            optimizer.zero_grad(set_to_none=True)

    return step, (model, optimizer)


def _tokens(cfg, device):
    gen = torch.Generator().manual_seed(cfg.training.seed)
    shape = (cfg.training.micro_batch_size, cfg.training.seq_length)
    return torch.randint(cfg.model.vocab_size, shape, generator=gen).to(device)
