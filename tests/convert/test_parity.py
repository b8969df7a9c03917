"""Logit parity between transformers and moe-lab on imported checkpoints, and bit-exact round trips.

Tiny random models are built with transformers' own config classes (fp32, order-one weights),
imported with `plan_import` + `write_import` (what `moe-lab convert hf-to-mcore` runs), loaded
into moe-lab's megatron model by the training code's checkpoint loader, and run side by side.
Run: pytest tests/convert/test_parity.py
"""

import json

import pytest
import torch
from safetensors import safe_open

from moe_lab.testing.hf_models import QWEN2_57B_LIKE, save_tiny_model, tiny_model

from .conftest import export_hf, import_hf, mcore_logits

TOLERANCE = 1e-4  # max abs logit difference, fp32 on the CPU

CASES = {
    "dense_gqa_bias": (False, {}),
    "dense_tied": (False, {"tie_word_embeddings": True}),
    "moe_topk_unnormalised": (True, {"norm_topk_prob": False}),
    "moe_topk_normalised": (True, {"norm_topk_prob": True}),
    "moe_every_2nd_layer_tied": (True, {"decoder_sparse_step": 2, "tie_word_embeddings": True}),
    "moe_mlp_only_layers": (True, {"mlp_only_layers": [0, 2], "norm_topk_prob": True}),
    "qwen2_57b_like": (True, QWEN2_57B_LIKE),
}


def hf_tensors(directory):
    """Every tensor of an HF directory, by name."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, world, tmp_path):
    moe, overrides = CASES[case]
    hf_model = save_tiny_model(tmp_path / "hf", moe, max_shard_size="200KB", **overrides)
    plan = import_hf(tmp_path / "hf", tmp_path / "mcore")
    tokens = torch.randint(hf_model.config.vocab_size, (2, 24), generator=torch.Generator()
                           .manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
    got = mcore_logits(plan.cfg, plan.out, tokens)
    assert got.shape == expected.shape
    assert expected.std() > 0.5  # logits of order one: the tolerance below means something
    assert (got - expected).abs().max().item() < TOLERANCE


def test_routing_flag_changes_the_logits_far_beyond_the_tolerance():
    """norm_topk_prob true/false give clearly different models, so parity on both is a test of
    the flag's mapping (and a swapped mapping would fail)."""
    tokens = torch.randint(256, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, renorm = (tiny_model(True, norm_topk_prob=flag) for flag in (False, True))
    with torch.no_grad():
        assert (plain(tokens).logits - renorm(tokens).logits).abs().max() > 100 * TOLERANCE


def test_imported_experiment_describes_the_hf_model(world, tmp_path):
    save_tiny_model(tmp_path / "hf", True, decoder_sparse_step=2, norm_topk_prob=True,
                    tie_word_embeddings=True, rope_theta=1000000.0, router_aux_loss_coef=0.01)
    plan = import_hf(tmp_path / "hf", tmp_path / "mcore")
    cfg = plan.cfg
    assert (cfg.model.num_layers, cfg.model.num_query_groups, cfg.model.ffn_hidden_size) == (4, 2, 96)
    assert cfg.model.rope_base == 1e6 and cfg.model.tie_embeddings and cfg.model.qkv_bias
    assert cfg.moe.layer_freq == 2 and cfg.moe.moe_layers(4) == [0, 1, 0, 1]
    assert cfg.moe.router == {"name": "topk_softmax", "norm_topk_prob": True}
    assert (cfg.moe.shared_expert_ffn, cfg.moe.shared_expert_gate, cfg.moe.balance.aux) == \
        (48, True, 0.01)
    assert cfg.checkpoint.init_from == str(plan.out)
    assert cfg.data.tokenizer is None  # the source has no tokenizer files
    written = (plan.out / "config.yaml").read_text()
    assert "init_from: " + str(plan.out) in written and "layer_freq: 2" in written
    assert (plan.out / "hf" / "config.json").is_file()


@pytest.mark.parametrize("moe, dtype", [(False, torch.float32), (True, torch.float32),
                                        (True, torch.bfloat16)])
def test_round_trip_reproduces_every_tensor_bit_for_bit(moe, dtype, world, tmp_path):
    overrides = {"decoder_sparse_step": 2} if moe else {"tie_word_embeddings": True}
    save_tiny_model(tmp_path / "hf", moe, dtype=dtype, max_shard_size="200KB", **overrides)
    plan = import_hf(tmp_path / "hf", tmp_path / "mcore")
    assert plan.cfg.training.precision == ("bf16" if dtype == torch.bfloat16 else "fp32")
    export_hf(plan.out, tmp_path / "back", max_shard_bytes=300_000)
    original, back = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)  # sharded output with its index


def save_word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "expert": 1, "router": 2}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def test_export_loads_in_transformers_with_the_same_config_and_logits(world, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_model = save_tiny_model(tmp_path / "hf", True, mlp_only_layers=[1], norm_topk_prob=True,
                               max_position_embeddings=384, bos_token_id=1, eos_token_id=2)
    save_word_tokenizer(tmp_path / "hf" / "tokenizer.json")
    plan = import_hf(tmp_path / "hf", tmp_path / "mcore")
    assert plan.cfg.data.tokenizer == str(plan.out / "hf")  # the data pipeline's tokenizer
    export_hf(plan.out, tmp_path / "back")
    exported_tokenizer = Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json"))
    assert exported_tokenizer.encode("router expert").ids == [2, 1]
    assert (tmp_path / "back" / "generation_config.json").is_file()
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"
    assert (config["decoder_sparse_step"], config["mlp_only_layers"]) == (1, [1])
    assert config["norm_topk_prob"] is True and config["shared_expert_intermediate_size"] == 48
    assert config["max_position_embeddings"] == 384 and config["eos_token_id"] == 2  # carried
    original = AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    exported = AutoConfig.from_pretrained(tmp_path / "back").to_dict()
    differing = {k for k in original.keys() | exported.keys()
                 if original.get(k) != exported.get(k)}
    assert differing == {"_name_or_path"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf_model(tokens).logits)


def test_upcycling_reads_a_dense_hf_directory_as_the_import_does(world, tmp_path):
    """The hook `moe-lab upcycle --from HF_DIR` calls: the same config and, by state_dict name,
    the same tensors as a model loaded from the imported checkpoint."""
    from moe_lab.config import ConfigError
    from moe_lab.convert import read_dense_config, read_dense_tensors
    from moe_lab.model import build_model, build_transformer_config
    from moe_lab.train.checkpoint import latest_checkpoint, load_checkpoint

    save_tiny_model(tmp_path / "hf", False, tie_word_embeddings=True)
    save_word_tokenizer(tmp_path / "hf" / "tokenizer.json")
    plan = import_hf(tmp_path / "hf", tmp_path / "mcore")
    dense = read_dense_config(tmp_path / "hf")
    assert dense.model == plan.cfg.model and not dense.moe.enabled
    assert dense.data.tokenizer == str((tmp_path / "hf").resolve())
    assert dense.checkpoint.init_from is None
    tensors = read_dense_tensors(tmp_path / "hf")
    model = build_model(plan.cfg, build_transformer_config(plan.cfg, use_cpu_initialization=True))
    load_checkpoint(latest_checkpoint(plan.out), model)
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert tensors.keys() == expected.keys()
    assert "decoder.layers.0.input_layernorm.weight" in tensors
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    save_tiny_model(tmp_path / "hf_moe", True)
    with pytest.raises(ConfigError, match="upcycle.source: .* holds a MoE model") as info:
        read_dense_config(tmp_path / "hf_moe")
    assert info.value.key == "upcycle.source"
