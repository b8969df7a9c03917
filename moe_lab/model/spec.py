"""Layer specs: which megatron-core modules make up a dense and a MoE transformer layer.

The one place where `model.backend` chooses modules: `local` (megatron's own modules), `te`
(Transformer Engine: fused attention and norms, grouped-GEMM experts, FP8) and `torch` (no TE:
SDPA attention and moe_lab's grouped-GEMM experts). MoE layers fill megatron's `MoESubmodules`
slots (experts, shared experts, router) through its extension points; the router builder comes
from `moe_lab.routers`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from moe_lab.experts import GroupedGemmExperts, TorchMoELayer
from moe_lab.model.attention import SDPACoreAttention
from moe_lab.model.norm import RMSNorm


def _backend_provider(backend: str):
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()


def _moe_mlp(backend: str, router_builder):
    provider = _backend_provider(backend)
    shared_mlp = MLPSubmodules(
        linear_fc1=provider.column_parallel_linear(),
        linear_fc2=provider.row_parallel_linear(),
        activation_func=provider.activation_func(),
    )
    if backend == "torch":
        # its grouped GEMM reads the tokens per expert on the GPU: no host wait per layer
        layer, experts = TorchMoELayer, GroupedGemmExperts
    else:
        layer, experts = MoELayer, provider.grouped_mlp_modules(backend == "te")
    return partial(
        layer,
        submodules=MoESubmodules(
            experts=experts,
            shared_experts=partial(SharedExpertMLP, submodules=shared_mlp),
            router=router_builder,
        ),
    )


def _layer_spec(backend: str, num_experts: int | None, moe_mlp) -> ModuleSpec:
    """A dense layer when num_experts is None, else a MoE layer whose MLP is `moe_mlp`."""
    is_moe = num_experts is not None
    if backend == "te":
        # TE fuses the pre-attention and dense pre-MLP norms into its linears.
        sub = get_gpt_layer_with_transformer_engine_submodules(
            num_experts=num_experts, moe_grouped_gemm=True
        )
        if is_moe:
            # A MoE layer keeps its pre-MLP norm as a module of its own (nothing to fuse it
            # into); checkpoints name it as the fused one, `mlp.linear_fc1.layer_norm_weight`,
            # as megatron's local spec does for every layer, so that weights move between
            # backends (te asked a local-backend checkpoint for `pre_mlp_layernorm.weight`).
            keys = {**sub.sharded_state_dict_keys_map,
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
            sub = dataclasses.replace(sub, sharded_state_dict_keys_map=keys)
    else:
        sub = get_gpt_layer_local_submodules(num_experts=None, normalization="RMSNorm")
        sub = dataclasses.replace(sub, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
        if backend == "torch":
            attention = dataclasses.replace(sub.self_attention.submodules,
                                            core_attention=SDPACoreAttention)
            sub = dataclasses.replace(sub, self_attention=dataclasses.replace(
                sub.self_attention, submodules=attention))
    if is_moe:
        sub = dataclasses.replace(sub, mlp=moe_mlp)
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def block_spec(config, backend: str, moe_pattern: list[int], router_builder, pp_rank=None):
    """The TransformerBlock spec for this pipeline stage's layers."""
    moe_mlp = _moe_mlp(backend, router_builder)
    specs = [
        _layer_spec(backend, config.num_moe_experts if is_moe else None, moe_mlp)
        for is_moe in moe_pattern
    ]
    offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, pp_rank=pp_rank)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + count], layer_norm=final_norm
    )
