"""The pure parts of the converter: tensor transforms, megatron key stacking, HF's MoE layer rule,
config fields both ways, and the command-line surface. No files, no processes.

Run: pytest tests/convert/test_mappings.py
"""

import dataclasses
import itertools

import pytest
import torch

from moe_lab import config as C
from moe_lab.convert import qwen2, qwen2_moe
from moe_lab.convert.families import family_for_architecture, family_for_experiment
from moe_lab.convert.hf_files import parse_size
from moe_lab.convert.mcore_keys import element_name, elements, stacked_axes
from moe_lab.convert.tensors import GLU_STACK, GroupedQKV
from moe_lab.launch.cli import build_parser

from ..conftest import TINY_DENSE, TINY_MOE


def test_qkv_is_interleaved_by_query_group_and_inverts_exactly():
    heads, groups, hd = 4, 2, 3
    # Row r of q/k/v holds the value 100*kind + r, so the interleaving can be read off.
    q, k, v = (torch.arange(n * hd, dtype=torch.float32)[:, None].repeat(1, 5) + 100 * kind
               for kind, n in enumerate((heads, groups, groups)))
    qkv = GroupedQKV(heads, groups, hd)
    fused = qkv.to_mcore([q, k, v])
    assert fused.shape == qkv.mcore_shape(((12, 5), (6, 5), (6, 5))) == (24, 5)
    # group 0: query heads 0-1, key head 0, value head 0; then group 1
    assert fused[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 100, 101, 102, 200, 201, 202,
                                    6, 7, 8, 9, 10, 11, 103, 104, 105, 203, 204, 205]
    assert all(torch.equal(a, b) for a, b in zip(qkv.to_hf(fused), (q, k, v)))
    bias = [t[:, 0] for t in (q, k, v)]
    assert all(torch.equal(a, b) for a, b in zip(qkv.to_hf(qkv.to_mcore(bias)), bias))


def test_swiglu_stacks_gate_over_up():
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    fused = GLU_STACK.to_mcore([gate, up])
    assert torch.equal(fused[:4], gate) and torch.equal(fused[4:], up)
    assert all(torch.equal(a, b) for a, b in zip(GLU_STACK.to_hf(fused), (gate, up)))


def test_megatron_stacked_keys_become_elements():
    assert stacked_axes("decoder.layers.mlp.linear_fc1.weight") == ("layer",)
    assert stacked_axes("decoder.layers.3.mlp.router.weight") == ()
    assert stacked_axes("decoder.layers.3.mlp.experts.experts.linear_fc2.weight") == ("expert",)
    assert stacked_axes("decoder.layers.mlp.experts.experts.linear_fc2.weight") == \
        ("layer", "expert")
    assert element_name("decoder.layers.mlp.experts.experts.linear_fc2.weight", (2, 5)) == \
        "decoder.layers.2.mlp.experts.5.linear_fc2.weight"
    assert [(n, i, s) for n, i, s in elements("decoder.layers.self_attention.linear_qkv.bias",
                                              (2, 12))] == [
        ("decoder.layers.0.self_attention.linear_qkv.bias", (0,), (12,)),
        ("decoder.layers.1.self_attention.linear_qkv.bias", (1,), (12,))]
    assert list(elements("embedding.word_embeddings.weight", (8, 4))) == \
        [("embedding.word_embeddings.weight", (), (8, 4))]


def test_hf_layer_rule_round_trips_through_moe_layer_freq():
    """Every (decoder_sparse_step, mlp_only_layers) gives back the same MoE layers."""
    for layers, step in itertools.product(range(1, 7), range(1, 5)):
        for count in range(3):
            for mlp_only in itertools.combinations(range(layers), count):
                pattern = qwen2_moe.hf_moe_layers(layers, step, list(mlp_only))
                new_step, new_only = qwen2_moe.sparse_step_and_mlp_only(pattern)
                assert qwen2_moe.hf_moe_layers(layers, new_step, new_only) == pattern
    assert qwen2_moe.sparse_step_and_mlp_only([0, 1, 0, 1, 0, 1]) == (2, [])
    assert qwen2_moe.sparse_step_and_mlp_only([0, 0, 0, 1, 0, 1]) == (2, [1])


@pytest.mark.parametrize("path, overrides", [
    (TINY_DENSE, []),
    (TINY_DENSE, ["model.tie_embeddings=true", "model.num_query_groups=null"]),
    (TINY_MOE, ["moe.router.norm_topk_prob=true", "moe.layer_freq=2"]),
    (TINY_MOE, ["moe.layer_freq=[0,1,1,0]"]),
])
def test_config_fields_round_trip(path, overrides):
    from transformers import AutoConfig

    cfg = C.load(path, overrides)
    family = family_for_experiment(cfg)
    fields = family.hf_config(cfg)
    hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    sections = family_for_architecture(fields["architectures"][0]).sections_from_hf(hf)
    again = C.from_dict(sections)
    assert C.to_dict(again)["model"] == {**C.to_dict(cfg)["model"],
                                         "num_query_groups": cfg.model.kv_heads}
    if cfg.moe.enabled:
        assert again.moe.moe_layers(4) == cfg.moe.moe_layers(4)
        assert again.moe.router["norm_topk_prob"] == cfg.moe.router.get("norm_topk_prob", False)
        for key in ("num_experts", "topk", "expert_ffn", "shared_expert_ffn"):
            assert getattr(again.moe, key) == getattr(cfg.moe, key)


@pytest.mark.parametrize("router, result", [
    ({"name": "topk_softmax"}, False),
    ({"name": "topk_softmax", "norm_topk_prob": True}, True),
    ({"name": "topk_softmax", "order": "topk_softmax"}, True),  # Mixtral's order: same function
    ({"name": "topk_softmax", "expert_bias": True}, "moe.router.expert_bias: true"),
    ({"name": "topk_softmax", "jitter": 0.1}, "moe.router.jitter: not a topk_softmax parameter"),
    ({"name": "topk_sigmoid"}, "moe.router.name: topk_sigmoid cannot be expressed"),
])
def test_router_settings_export_as_norm_topk_prob_or_are_refused(router, result):
    from moe_lab.convert.errors import ConversionError

    cfg = C.load(TINY_MOE)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router=router))
    if isinstance(result, bool):
        assert qwen2_moe.FAMILY.hf_config(cfg)["norm_topk_prob"] is result
    else:
        with pytest.raises(ConversionError, match=result):
            qwen2_moe.FAMILY.hf_config(cfg)


def test_every_tensor_is_mapped_once():
    cfg = C.load(TINY_MOE, ["moe.layer_freq=2", "model.tie_embeddings=true"])
    maps = qwen2_moe.FAMILY.tensor_maps(cfg)
    hf_names = [n for tm in maps for n in tm.hf]
    mcore_names = [tm.mcore for tm in maps]
    assert len(hf_names) == len(set(hf_names)) and len(mcore_names) == len(set(mcore_names))
    # 2 dense + 2 MoE layers: 1 embedding, 4x(norm, qkv w, qkv b, proj, pre-MLP norm),
    # 2x(fc1, fc2), 2x(router, 8x(fc1, fc2), shared fc1, fc2, gate), final norm; tied: no head
    assert len(maps) == 1 + 4 * 5 + 2 * 2 + 2 * (1 + 16 + 3) + 1
    assert "lm_head.weight" not in hf_names
    dense = qwen2.FAMILY.tensor_maps(C.load(TINY_DENSE))
    assert dense[-1].hf == ("lm_head.weight",)


def test_max_shard_size_parses_like_transformers():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000


def test_convert_command_surface_is_frozen():
    commands = build_parser()._subparsers._group_actions[0].choices
    directions = commands["convert"]._subparsers._group_actions[0].choices
    assert set(directions) == {"hf-to-mcore", "mcore-to-hf"}
    options = {o for a in directions["hf-to-mcore"]._actions for o in a.option_strings}
    assert "--layout" in options
    options = {o for a in directions["mcore-to-hf"]._actions for o in a.option_strings}
    assert {"--config", "--dtype", "--max-shard-size", "--hf-template"} <= options


# Shaped like the released Qwen2-57B-A14B config.json, with transformers 4's keys (rope_theta,
# torch_dtype, sliding_window) as the hub files have them.
QWEN2_57B_CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "decoder_sparse_step": 1,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "moe_intermediate_size": 2560, "norm_topk_prob": False, "num_attention_heads": 28,
    "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 20480, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_a_released_style_config_maps_onto_the_preset(tmp_path):
    import json

    from moe_lab.convert.hf_files import parse_config

    (tmp_path / "config.json").write_text(json.dumps(QWEN2_57B_CONFIG))
    family = family_for_architecture("Qwen2MoeForCausalLM")
    imported = C.from_dict(family.sections_from_hf(parse_config(tmp_path)))
    preset = C.load("qwen2-57b-a14b")
    assert C.to_dict(imported)["model"] == {**C.to_dict(preset)["model"], "backend": "local"}
    assert C.to_dict(imported)["moe"] == C.to_dict(preset)["moe"]
    exported = family.hf_config(preset)
    assert {k: exported[k] for k in exported if k in QWEN2_57B_CONFIG} == {
        k: QWEN2_57B_CONFIG[k] for k in exported if k in QWEN2_57B_CONFIG}
