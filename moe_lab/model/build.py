"""Experiment config -> megatron-core TransformerConfig -> GPTModel for this pipeline stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import fused_apply_rotary_pos_emb
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from moe_lab.config import ExperimentConfig
from moe_lab.model.spec import block_spec
from moe_lab.routers import resolve_router, token_ids

_PARAMS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
_RECOMPUTE = {
    "none": {},
    # Recompute the MoE expert MLPs and the core attention, where activations are largest.
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "moe"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1},
}


def build_transformer_config(cfg: ExperimentConfig, use_cpu_initialization: bool) -> TransformerConfig:
    """`use_cpu_initialization` (the CPU path) builds each full weight and splits it, so that
    every TP layout starts from the same weights for a given seed."""
    m, moe, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.training
    dtype = _PARAMS_DTYPE[t.precision]
    fields = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.kv_heads,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        init_method_std=m.init_std,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        # megatron's fused SwiGLU (torch.compile'd; Megatron-LM's default) for the models that
        # train on the GPU; on the CPU compiling would only add start-up time
        bias_activation_fusion=not use_cpu_initialization,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        context_parallel_size=p.cp,
        sequence_parallel=p.use_sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=t.precision in ("bf16", "fp8"),
        use_cpu_initialization=use_cpu_initialization,
        variable_seq_lengths=False,
        attention_backend=AttnBackend[m.attention_backend],
        **_RECOMPUTE[t.recompute],
    )
    te_rope = fused_apply_rotary_pos_emb is not None and not use_cpu_initialization
    if m.rope_fusion and (m.backend == "te" or (m.backend == "torch" and te_rope)):
        # TE's fused RoPE (megatron imports it where TE is installed): one kernel each way
        # instead of several elementwise passes over the queries and keys. The local backend,
        # the numerical reference, keeps megatron's unfused RoPE.
        fields.update(apply_rope_fusion=True)
    if t.precision == "fp8":
        fields.update(fp8_fields(t.fp8_recipe))
    if moe.enabled:
        fields.update(_moe_fields(cfg))
    return TransformerConfig(**fields)


def fp8_fields(recipe: str) -> dict:
    """megatron's FP8 settings for `training.fp8_recipe`."""
    fields = dict(fp8="e4m3" if recipe in ("blockwise", "mxfp8") else "hybrid", fp8_recipe=recipe)
    if recipe == "delayed":
        # Transformer Engine's own DelayedScaling default: the scale follows the largest amax of
        # the last 1024 steps, where megatron's default follows the previous step's alone.
        fields.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return fields


def _moe_fields(cfg: ExperimentConfig) -> dict:
    moe, balance = cfg.moe, cfg.moe.balance
    losses = [(name, coeff) for name, coeff in (("aux_loss", balance.aux),
              ("seq_aux_loss", balance.seq_aux), ("global_aux_loss", balance.global_aux))
              if coeff > 0]
    fields = dict(
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.expert_ffn,
        moe_router_topk=moe.topk,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn or None,
        moe_shared_expert_gate=bool(moe.shared_expert_ffn) and moe.shared_expert_gate,
        moe_layer_freq=moe.moe_layers(cfg.model.num_layers),
        moe_token_dispatcher_type=moe.dispatcher,
        moe_router_load_balancing_type=[n for n, _ in losses] or "none",
        moe_aux_loss_coeff=[c for _, c in losses] or 0.0,
        moe_z_loss_coeff=balance.z or None,
        moe_router_dtype="fp32",
        moe_grouped_gemm=cfg.model.backend == "te",
        # TE's fused token permutation in megatron's dispatchers (Megatron-LM's
        # --moe-permute-fusion): one kernel each way instead of sorts and index copies
        moe_permute_fusion=cfg.model.backend == "te",
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_pad_expert_input_to_capacity=False,
    )
    fields.update(resolve_router(moe.router, cfg).transformer_config_fields())
    return fields


def build_model(cfg: ExperimentConfig, config: TransformerConfig) -> GPTModel:
    """Build this rank's pipeline stage of the model (all of it when pp == 1)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    choice = resolve_router(cfg.moe.router, cfg) if cfg.moe.enabled else None
    router = choice.builder() if choice else None
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(
            config, cfg.model.backend, cfg.moe.moe_layers(cfg.model.num_layers), router, pp_rank
        ),
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.training.seq_length,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rope_base),
    )
    if choice and choice.needs_token_ids:
        token_ids.attach(model, config)
    return model
