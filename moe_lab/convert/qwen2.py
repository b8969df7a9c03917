"""Qwen2ForCausalLM <-> moe-lab's dense Qwen2: config fields and every tensor, explicitly.

The attention, norm, embedding and dense-MLP mappings here are also the non-expert part of
Qwen2-MoE (qwen2_moe.py). Megatron names are dist-checkpoint names (see mcore_keys.py): the
local layer spec stores the input norm as `self_attention.linear_qkv.layer_norm_weight` and the
pre-MLP norm as `mlp.linear_fc1.layer_norm_weight` (TE's fused names), which is what every
backend reads.
"""

from __future__ import annotations

from typing import Any

from moe_lab.config import ExperimentConfig
from moe_lab.convert.errors import ConversionError
from moe_lab.convert.families import Family, register_family
from moe_lab.convert.tensors import GLU_STACK, GroupedQKV, TensorMap, copy_map

# config.json keys moe-lab does not model; carried over from the source checkpoint's config
# when one is known, so that an exported model keeps its token ids and context length.
CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                "max_window_layers", "sliding_window", "use_cache")


# ---- config ------------------------------------------------------------------------------


def rope_theta(hf: Any) -> float:
    """RoPE base from transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConversionError(f"rope_parameters.rope_type: {rope_type} is not supported "
                              "(moe-lab's RoPE is the plain default; no YaRN or other scaling)")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise ConversionError("rope_theta: missing")
    if float(theta) != int(theta):
        # megatron's GPTModel takes an integer rotary_base.
        raise ConversionError(f"rope_theta: {theta} is not an integer; moe-lab's RoPE base is")
    return float(theta)


def check_supported(hf: Any) -> None:
    """Refuse what moe-lab's Qwen2 cannot compute identically, naming the config.json key."""
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act: {hf.hidden_act} is not supported (SwiGLU uses silu)")
    if getattr(hf, "use_sliding_window", False):
        raise ConversionError("use_sliding_window: true is not supported (full causal "
                              "attention only)")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hf.hidden_size // hf.num_attention_heads):
        raise ConversionError(f"head_dim: {head_dim} differs from hidden_size / "
                              f"num_attention_heads = {hf.hidden_size // hf.num_attention_heads}")


def model_section(hf: Any, qkv_bias: bool = True) -> dict:
    check_supported(hf)
    return dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads or hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        rope_base=rope_theta(hf),
        tie_embeddings=bool(hf.tie_word_embeddings),
        qkv_bias=qkv_bias,
        norm_eps=float(hf.rms_norm_eps),
        init_std=float(hf.initializer_range),
        backend="local",
    )


def base_hf_config(cfg: ExperimentConfig, family: Family) -> dict:
    """The config.json fields shared by Qwen2 and Qwen2-MoE."""
    m = cfg.model
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        # rope_theta for transformers 4 and vLLM, rope_parameters for transformers 5.
        "rope_theta": m.rope_base,
        "rope_parameters": {"rope_theta": m.rope_base, "rope_type": "default"},
        "use_sliding_window": False,
    }


def _sections_from_hf(hf: Any) -> dict:
    return {"model": model_section(hf)}


def _hf_config(cfg: ExperimentConfig) -> dict:
    if cfg.moe.enabled:
        raise ConversionError("moe.num_experts: a MoE model is not a Qwen2ForCausalLM")
    if not cfg.model.qkv_bias:
        raise ConversionError("model.qkv_bias: false cannot be expressed in Qwen2ForCausalLM, "
                              "whose Q/K/V projections always have a bias")
    return base_hf_config(cfg, FAMILY)


# ---- tensors -----------------------------------------------------------------------------


def embedding_maps(cfg: ExperimentConfig) -> list[TensorMap]:
    m = cfg.model
    return [copy_map("embedding.word_embeddings.weight", "model.embed_tokens.weight",
                     (m.vocab_size, m.hidden_size))]


def attention_maps(cfg: ExperimentConfig, i: int) -> list[TensorMap]:
    m = cfg.model
    hd, h = m.head_dim, m.hidden_size
    q_rows, kv_rows = m.num_attention_heads * hd, m.kv_heads * hd
    mc, hf = f"decoder.layers.{i}.self_attention.", f"model.layers.{i}.self_attn."
    qkv = GroupedQKV(m.num_attention_heads, m.kv_heads, hd)
    maps = [
        copy_map(f"{mc}linear_qkv.layer_norm_weight", f"model.layers.{i}.input_layernorm.weight",
                 (h,), aliases=(f"decoder.layers.{i}.input_layernorm.weight",)),
        TensorMap(f"{mc}linear_qkv.weight", tuple(f"{hf}{p}_proj.weight" for p in "qkv"),
                  ((q_rows, h), (kv_rows, h), (kv_rows, h)), qkv),
        copy_map(f"{mc}linear_proj.weight", f"{hf}o_proj.weight", (h, q_rows)),
    ]
    if m.qkv_bias:
        maps.append(TensorMap(f"{mc}linear_qkv.bias", tuple(f"{hf}{p}_proj.bias" for p in "qkv"),
                              ((q_rows,), (kv_rows,), (kv_rows,)), qkv))
    return maps


def pre_mlp_norm_map(cfg: ExperimentConfig, i: int) -> TensorMap:
    return copy_map(f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
                    f"model.layers.{i}.post_attention_layernorm.weight", (cfg.model.hidden_size,),
                    aliases=(f"decoder.layers.{i}.pre_mlp_layernorm.weight",))


def swiglu_maps(mcore_prefix: str, hf_prefix: str, hidden: int, ffn: int) -> list[TensorMap]:
    """A SwiGLU MLP: megatron linear_fc1 = [gate_proj; up_proj], linear_fc2 = down_proj."""
    return [
        TensorMap(f"{mcore_prefix}linear_fc1.weight",
                  (f"{hf_prefix}gate_proj.weight", f"{hf_prefix}up_proj.weight"),
                  ((ffn, hidden), (ffn, hidden)), GLU_STACK),
        copy_map(f"{mcore_prefix}linear_fc2.weight", f"{hf_prefix}down_proj.weight", (hidden, ffn)),
    ]


def dense_mlp_maps(cfg: ExperimentConfig, i: int) -> list[TensorMap]:
    return swiglu_maps(f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp.",
                       cfg.model.hidden_size, cfg.model.ffn_hidden_size)


def output_maps(cfg: ExperimentConfig) -> list[TensorMap]:
    m = cfg.model
    maps = [copy_map("decoder.final_layernorm.weight", "model.norm.weight", (m.hidden_size,))]
    if not m.tie_embeddings:
        maps.append(copy_map("output_layer.weight", "lm_head.weight",
                             (m.vocab_size, m.hidden_size)))
    return maps


def _tensor_maps(cfg: ExperimentConfig) -> list[TensorMap]:
    maps = embedding_maps(cfg)
    for i in range(cfg.model.num_layers):
        maps += attention_maps(cfg, i) + [pre_mlp_norm_map(cfg, i)] + dense_mlp_maps(cfg, i)
    return maps + output_maps(cfg)


FAMILY = register_family(Family(
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    sections_from_hf=_sections_from_hf,
    hf_config=_hf_config,
    tensor_maps=_tensor_maps,
    carried_keys=CARRIED_KEYS,
    handles=lambda cfg: not cfg.moe.enabled,
))
