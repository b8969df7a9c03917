"""Numbers derived from a config before anything is built: parameter counts and FLOPs per token.

Counting follows Qwen2 / Qwen2-MoE: QKV bias only, SwiGLU MLPs (three matrices), RMSNorm weights,
a router matrix and an optional shared expert with a 1-unit sigmoid gate per MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lab.config.schema import ExperimentConfig


@dataclass(frozen=True)
class DerivedNumbers:
    total_params: int
    active_params: int  # parameters one token passes through (top-k experts only)
    active_matmul_params: int  # the active parameters that are matmul weights, LM head included
    flops_per_token: float  # training (fwd + bwd) model FLOPs per token
    moe_layers: int
    experts_per_ep_rank: int

    def as_lines(self) -> list[str]:
        return [
            f"total parameters:   {_human(self.total_params)} ({self.total_params:,})",
            f"active parameters:  {_human(self.active_params)} ({self.active_params:,})",
            f"FLOPs per token:    {self.flops_per_token / 1e9:.3f} GFLOP (training, fwd+bwd)",
            f"MoE layers:         {self.moe_layers}",
            f"experts per EP rank: {self.experts_per_ep_rank}",
        ]


def derive(config: ExperimentConfig) -> DerivedNumbers:
    m, moe = config.model, config.moe
    h, heads_dim = m.hidden_size, m.head_dim
    qkv_out = h + 2 * m.kv_heads * heads_dim
    attention_matmul = h * qkv_out + h * h
    attention = attention_matmul + (qkv_out if m.qkv_bias else 0)
    norms = 2 * h

    def mlp(ffn: int) -> int:
        return 3 * h * ffn

    total = active = matmul = 0
    pattern = moe.moe_layers(m.num_layers)
    for is_moe in pattern:
        total += attention + norms
        active += attention + norms
        matmul += attention_matmul
        if is_moe:
            router = h * moe.num_experts
            shared = mlp(moe.shared_expert_ffn) if moe.shared_expert_ffn else 0
            gate = h if moe.shared_expert_ffn and moe.shared_expert_gate else 0
            routed_active = moe.topk * mlp(moe.expert_ffn)
            total += router + moe.num_experts * mlp(moe.expert_ffn) + shared + gate
            active += router + routed_active + shared + gate
            matmul += router + routed_active + shared + gate
        else:
            total += mlp(m.ffn_hidden_size)
            active += mlp(m.ffn_hidden_size)
            matmul += mlp(m.ffn_hidden_size)
    embedding = m.vocab_size * h
    head = 0 if m.tie_embeddings else m.vocab_size * h
    total += embedding + head + h
    active += embedding + head + h
    matmul += m.vocab_size * h  # the LM head multiplies whether or not it is tied
    # Causal attention scores and values: 2*2*s*h/2 per token per layer forward, x3 for training.
    attention_flops = 6 * m.num_layers * config.training.seq_length * h
    return DerivedNumbers(
        total_params=total,
        active_params=active,
        active_matmul_params=matmul,
        flops_per_token=6.0 * matmul + attention_flops,
        moe_layers=sum(pattern),
        experts_per_ep_rank=moe.num_experts // config.parallel.ep if moe.enabled else 0,
    )


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
