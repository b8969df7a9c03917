"""Corrupt, incomplete or inexpressible inputs stop with one line naming the tensor, file or key,
before anything is written to the output.

Import checks run on config.json and the safetensors headers alone; export checks on the
checkpoint's metadata. Run: pytest tests/convert/test_refusals.py
"""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from moe_lab.config import ConfigError
from moe_lab.convert import ConversionError, parse_layout, plan_export, plan_import
from moe_lab.testing import run_cli
from moe_lab.testing.hf_models import save_tiny_model

from .conftest import import_hf

EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    """A single-file tiny Qwen2-MoE; tests copy it and break the copy."""
    directory = tmp_path_factory.mktemp("hf") / "moe"
    save_tiny_model(directory, True)
    return directory


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "sharded"
    save_tiny_model(directory, True, max_shard_size="200KB")
    return directory


def broken_copy(source, target, edit):
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def edit_config(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def refused_import(hf_dir, out, match, layout=None):
    with pytest.raises((ConversionError, ConfigError), match=match) as info:
        plan_import(hf_dir, out, layout or {})
    assert "\n" not in str(info.value)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return str(info.value)


def test_a_dropped_expert_weight_is_named(hf_moe, tmp_path):
    hf = broken_copy(hf_moe, tmp_path / "hf", lambda t: t.pop(EXPERT))
    message = refused_import(hf, tmp_path / "out", f"^{EXPERT}: missing from ")
    assert "Qwen2MoeForCausalLM" in message


def test_an_extra_expert_is_refused_not_dropped(hf_moe, tmp_path):
    extra = "model.layers.0.mlp.experts.8.gate_proj.weight"
    hf = broken_copy(hf_moe, tmp_path / "hf",
                     lambda t: t.update({extra: t["model.layers.0.mlp.experts.0.gate_proj.weight"]
                                         .clone()}))
    refused_import(hf, tmp_path / "out", f"^{extra}: stored in .*refusing to drop it")


def test_a_tied_checkpoint_that_still_holds_lm_head_is_refused(tmp_path):
    save_tiny_model(tmp_path / "hf", False, tie_word_embeddings=True)
    broken_copy(tmp_path / "hf", tmp_path / "hf2",
                lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    refused_import(tmp_path / "hf2", tmp_path / "out",
                   "lm_head.weight: .*tie_word_embeddings: true")


def test_a_wrong_shape_is_named_with_both_shapes(hf_moe, tmp_path):
    name = "model.layers.2.self_attn.k_proj.weight"
    hf = broken_copy(hf_moe, tmp_path / "hf", lambda t: t.update({name: t[name][:16].clone()}))
    refused_import(hf, tmp_path / "out", rf"^{name}: shape \[16, 64\] in .*expected \[32, 64\]")


def test_a_missing_shard_is_named(hf_sharded, tmp_path):
    shutil.copytree(hf_sharded, tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[2]
    (tmp_path / "hf" / shard).unlink()
    refused_import(tmp_path / "hf", tmp_path / "out", rf"{shard}: missing shard \(listed in ")


def test_an_index_that_disagrees_with_its_shards_is_named(hf_sharded, tmp_path):
    shutil.copytree(hf_sharded, tmp_path / "hf")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = sorted(index["weight_map"])[5]
    index["weight_map"][name] = next(f for f in index["weight_map"].values()
                                     if f != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    refused_import(tmp_path / "hf", tmp_path / "out", rf"{name}: ")


def test_a_truncated_file_is_named(hf_moe, tmp_path):
    shutil.copytree(hf_moe, tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    refused_import(tmp_path / "hf", tmp_path / "out",
                   r"model\.safetensors: not a readable safetensors file")


@pytest.mark.parametrize("changes, match", [
    ({"architectures": ["LlamaForCausalLM"]}, "unknown architecture 'LlamaForCausalLM' "
                                              r"\(supported: Qwen2ForCausalLM, Qwen2MoeForCausalLM\)"),
    ({"use_sliding_window": True}, "use_sliding_window: true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act: gelu is not supported"),
    ({"hidden_size": "wide"}, "hidden_size.* expected int"),
    ({"model_type": "qwen2"}, "model_type: qwen2 does not go with architectures "
                              "Qwen2MoeForCausalLM"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": 64}},
     "rope_type: yarn is not supported"),
])
def test_unsupported_config_is_named(changes, match, hf_moe, tmp_path):
    hf = edit_config(hf_moe, tmp_path / "hf", **changes)
    message = refused_import(hf, tmp_path / "out", match)
    assert message.startswith(str(hf / "config.json"))


def test_layouts_that_do_not_fit_the_model_are_refused(hf_moe, tmp_path):
    refused_import(hf_moe, tmp_path / "out", "moe.expert_ffn: 32 is not divisible by etp=3",
                   layout={"etp": 3})
    refused_import(hf_moe, tmp_path / "out", "parallel.tp: 3 does not divide", layout={"tp": 3})
    with pytest.raises(ConversionError, match="--layout: 'tp=two' is not one of tp=N"):
        parse_layout("tp=two")
    assert parse_layout("tp=2,ep=4") == {"tp": 2, "ep": 4}


def test_an_existing_output_is_never_overwritten(hf_moe, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        plan_import(hf_moe, tmp_path / "out", {})
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep"


def test_a_directory_without_weights_or_config_is_named(hf_moe, tmp_path):
    refused_import(tmp_path, tmp_path / "out", "config.json: not found")
    shutil.copytree(hf_moe, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    refused_import(tmp_path / "hf", tmp_path / "out", "no model.safetensors or "
                                                      r"model.safetensors.index.json")


# ---- export ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(world, hf_moe, tmp_path_factory):
    """The tiny MoE imported once (an untied model, MoE in every layer)."""
    return import_hf(hf_moe, tmp_path_factory.mktemp("mcore") / "moe").out


def variant(imported, tmp_path, text):
    """An experiment config that differs from the imported one by `text` (YAML)."""
    path = tmp_path / "variant.yaml"
    path.write_text(f"base: {imported / 'config.yaml'}\n{text}")
    return path


@pytest.mark.parametrize("text, match", [
    ("model: {tie_embeddings: true}", r"^output_layer\.weight: in .* but Qwen2MoeForCausalLM has "
                                      "no such tensor; refusing to drop it"),
    ("model: {num_layers: 5}", r"^decoder\.layers\.4\..*: missing from "),
    ("moe: {expert_ffn: 16}", r"^decoder\.layers\.0\.mlp\.experts\.0\.linear_fc1\.weight: shape "
                              r"\[64, 64\] in .*expected \[32, 64\]"),
    ("moe: {router: {name: topk_sigmoid}}", "moe.router.name: topk_sigmoid cannot be expressed "
                                            "in Qwen2MoeForCausalLM"),
    ("moe: {shared_expert_ffn: 0}", "moe.shared_expert_ffn: Qwen2MoeForCausalLM always has a "
                                    "sigmoid-gated shared expert"),
])
def test_export_refuses_a_checkpoint_the_config_does_not_describe(text, match, imported, tmp_path):
    with pytest.raises(ConversionError, match=match) as info:
        plan_export(imported, tmp_path / "hf", config_path=variant(imported, tmp_path, text))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="neither a run directory"):
        plan_export(tmp_path, tmp_path / "hf")


def test_cli_refusal_is_one_line_with_exit_code_2(hf_moe, tmp_path):
    hf = broken_copy(hf_moe, tmp_path / "hf", lambda t: t.pop(EXPERT))
    result = run_cli(["convert", "hf-to-mcore", str(hf), str(tmp_path / "out")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moe-lab: error: {EXPERT}: missing from"), \
        result.stderr
    assert not (tmp_path / "out").exists()
