"""Qwen2MoeForCausalLM <-> moe-lab's Qwen2-MoE: config fields and every tensor, explicitly.

Routing: HF takes a softmax over all experts, then the top k, renormalising the k weights only
when `norm_topk_prob`; moe-lab's `topk_softmax` router maps that flag onto megatron's softmax
order (routers/topk.py), so the flag travels as it is. The shared expert is always present in
HF and always gated by sigmoid(x . shared_expert_gate). Which layers are MoE: HF's rule (layer i
is MoE when (i+1) % decoder_sparse_step == 0 and i is not in mlp_only_layers) becomes
`moe.layer_freq` (the step itself when mlp_only_layers is empty, else the explicit 0/1 list).
"""

from __future__ import annotations

from math import gcd
from typing import Any

from moe_lab.config import ExperimentConfig
from moe_lab.convert import qwen2
from moe_lab.convert.errors import ConversionError
from moe_lab.convert.families import Family, register_family
from moe_lab.convert.tensors import TensorMap, copy_map

CARRIED_KEYS = (*qwen2.CARRIED_KEYS, "output_router_logits")
# topk_softmax parameters the export understands. `order: topk_softmax` (Mixtral's softmax over
# the k chosen logits) is the same function as softmax-then-top-k with norm_topk_prob, and is
# exported as that; an expert bias changes which experts are chosen and has no HF counterpart.
_ROUTER_KEYS = ("name", "norm_topk_prob", "order", "expert_bias", "bias_update_rate")


# ---- config ------------------------------------------------------------------------------


def hf_moe_layers(num_layers: int, sparse_step: int, mlp_only: list[int]) -> list[int]:
    """HF Qwen2-MoE's rule, as a 0/1 list per layer."""
    return [int(i not in mlp_only and (i + 1) % sparse_step == 0) for i in range(num_layers)]


def _layer_freq(hf: Any) -> int | list[int]:
    step = int(hf.decoder_sparse_step)
    if step < 1:
        raise ConversionError(f"decoder_sparse_step: must be >= 1, got {step}")
    mlp_only = list(hf.mlp_only_layers or [])
    if not mlp_only:
        return step
    return hf_moe_layers(hf.num_hidden_layers, step, mlp_only)


def sparse_step_and_mlp_only(pattern: list[int]) -> tuple[int, list[int]]:
    """The largest decoder_sparse_step whose rule, with mlp_only_layers, gives `pattern`."""
    moe_layers = [i for i, is_moe in enumerate(pattern) if is_moe]
    step = 0
    for i in moe_layers:
        step = gcd(step, i + 1)
    step = step or 1
    mlp_only = [i for i, is_moe in enumerate(pattern) if not is_moe and (i + 1) % step == 0]
    return step, mlp_only


def _sections_from_hf(hf: Any) -> dict:
    if not hf.num_experts:
        raise ConversionError("num_experts: 0 (no experts); convert a dense model as "
                              "Qwen2ForCausalLM")
    return {
        "model": qwen2.model_section(hf, qkv_bias=bool(getattr(hf, "qkv_bias", True))),
        "moe": {
            "num_experts": hf.num_experts,
            "topk": hf.num_experts_per_tok,
            "expert_ffn": hf.moe_intermediate_size,
            "shared_expert_ffn": hf.shared_expert_intermediate_size,
            "shared_expert_gate": True,
            "layer_freq": _layer_freq(hf),
            "router": {"name": "topk_softmax", "norm_topk_prob": bool(hf.norm_topk_prob)},
            "balance": {"aux": float(hf.router_aux_loss_coef)},
        },
    }


def _norm_topk_prob(router: dict) -> bool:
    """HF's norm_topk_prob for a moe.router section, refusing what HF cannot express."""
    if router.get("name") != "topk_softmax":
        raise ConversionError(f"moe.router.name: {router.get('name')} cannot be expressed in "
                              "Qwen2MoeForCausalLM, which routes by softmax then top-k "
                              "(topk_softmax)")
    unknown = sorted(set(router) - set(_ROUTER_KEYS))
    if unknown:
        raise ConversionError(f"moe.router.{unknown[0]}: not a topk_softmax parameter the "
                              f"Qwen2MoeForCausalLM export knows ({', '.join(_ROUTER_KEYS[1:])})")
    if router.get("expert_bias"):
        raise ConversionError("moe.router.expert_bias: true (a bias on expert selection) cannot "
                              "be expressed in Qwen2MoeForCausalLM")
    return bool(router.get("norm_topk_prob", False)) or router.get("order") == "topk_softmax"


def _hf_config(cfg: ExperimentConfig) -> dict:
    moe = cfg.moe
    norm_topk_prob = _norm_topk_prob(dict(moe.router))
    if not moe.shared_expert_ffn or not moe.shared_expert_gate:
        key = "moe.shared_expert_gate" if moe.shared_expert_ffn else "moe.shared_expert_ffn"
        raise ConversionError(f"{key}: Qwen2MoeForCausalLM always has a sigmoid-gated shared "
                              "expert; this model has none")
    if isinstance(moe.layer_freq, int):
        step, mlp_only = moe.layer_freq, []
    else:
        step, mlp_only = sparse_step_and_mlp_only(moe.layer_freq)
    fields = qwen2.base_hf_config(cfg, FAMILY)
    fields.update(
        qkv_bias=cfg.model.qkv_bias,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.topk,
        moe_intermediate_size=moe.expert_ffn,
        shared_expert_intermediate_size=moe.shared_expert_ffn,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
        router_aux_loss_coef=moe.balance.aux,
    )
    return fields


# ---- tensors -----------------------------------------------------------------------------


def moe_mlp_maps(cfg: ExperimentConfig, i: int) -> list[TensorMap]:
    """Router, every routed expert, the shared expert and its gate of MoE layer i."""
    h, moe = cfg.model.hidden_size, cfg.moe
    mc, hf = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
    maps = [copy_map(f"{mc}router.weight", f"{hf}gate.weight", (moe.num_experts, h))]
    for e in range(moe.num_experts):
        maps += qwen2.swiglu_maps(f"{mc}experts.{e}.", f"{hf}experts.{e}.", h, moe.expert_ffn)
    maps += qwen2.swiglu_maps(f"{mc}shared_experts.", f"{hf}shared_expert.", h,
                              moe.shared_expert_ffn)
    maps.append(copy_map(f"{mc}shared_experts.gate_weight", f"{hf}shared_expert_gate.weight",
                         (1, h)))
    return maps


def _tensor_maps(cfg: ExperimentConfig) -> list[TensorMap]:
    maps = qwen2.embedding_maps(cfg)
    for i, is_moe in enumerate(cfg.moe.moe_layers(cfg.model.num_layers)):
        maps += qwen2.attention_maps(cfg, i) + [qwen2.pre_mlp_norm_map(cfg, i)]
        maps += moe_mlp_maps(cfg, i) if is_moe else qwen2.dense_mlp_maps(cfg, i)
    return maps + qwen2.output_maps(cfg)


FAMILY = register_family(Family(
    architecture="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    sections_from_hf=_sections_from_hf,
    hf_config=_hf_config,
    tensor_maps=_tensor_maps,
    carried_keys=CARRIED_KEYS,
    handles=lambda cfg: cfg.moe.enabled,
))
