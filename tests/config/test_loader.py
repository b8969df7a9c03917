"""Config loading: inheritance, overrides, strict keys/types, one-line errors naming key and file.

Run: pytest tests/config
"""

from pathlib import Path

import pytest

from moe_lab import config as C
from moe_lab.config import ConfigError

from ..conftest import TINY_DENSE, TINY_MOE


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path):
    write(tmp_path, "parent.yaml", "model: {num_layers: 4, hidden_size: 64}\n"
                                   "optimizer: {betas: [0.9, 0.95], lr: 0.001}\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\nmodel: {num_layers: 2}\n"
                                          "optimizer: {betas: [0.8, 0.9]}\n")
    cfg = C.load(child)
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 64
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.optimizer.lr == 0.001


def test_dotted_overrides_are_typed():
    cfg = C.load(TINY_MOE, ["optimizer.lr=1e-3", "moe.topk=3", "parallel.sequence_parallel=false",
                            "moe.router.norm_topk_prob=true"])
    assert cfg.optimizer.lr == 1e-3 and cfg.moe.topk == 3
    assert cfg.parallel.sequence_parallel is False
    assert cfg.moe.router == {"name": "topk_softmax", "norm_topk_prob": True}


def test_preset_names_resolve():
    cfg = C.load("qwen2-57b-a14b")
    assert (cfg.moe.num_experts, cfg.moe.topk, cfg.moe.expert_ffn) == (64, 8, 2560)
    assert cfg.model.num_query_groups == 4


def test_tiny_dense_is_dense():
    cfg = C.load(TINY_DENSE)
    assert not cfg.moe.enabled and cfg.moe.moe_layers(cfg.model.num_layers) == [0, 0, 0, 0]


@pytest.mark.parametrize("override, key", [
    ("model.hidden_sze=32", "model.hidden_sze: unknown key"),
    ("model.num_layers=two", "model.num_layers: expected int, got 'two'"),
    ("model.num_layers=1.5", "model.num_layers: expected int"),
    ("model.hidden_size=-64", "model.hidden_size: must be > 0"),
    ("parallel.ep=3", "parallel.ep: moe.num_experts 8 is not divisible by ep 3"),
    ("moe.dispatcher=nccl", "moe.dispatcher: must be one of alltoall, allgather"),
    ("parallel.cp=2", "parallel.cp: context parallelism (cp=2) needs model.backend=te"),
    ("optimizer.exp_avg_dtype=bf16", "optimizer.exp_avg_dtype: bf16 needs "
                                     "optimizer.precision_aware=true"),
    ("optimizer.main_grads_dtype=fp16", "optimizer.main_grads_dtype: must be one of fp32, bf16"),
    ("optimizer.precision_aware=true", "optimizer.precision_aware: needs bf16 model weights"),
    ("model.attention_backend=fused", "model.attention_backend: fused needs model.backend te "
                                      "or torch"),
    ("model.attention_backend=fa3", "model.attention_backend: must be one of auto, flash"),
])
def test_command_line_errors_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        C.load(TINY_MOE, [override])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("command line: ") and key in message


def test_file_errors_name_the_file_that_set_the_key(tmp_path):
    base = write(tmp_path, "base.yaml", "model: {num_layers: 4}\nmoe: {num_experts: 6, "
                                        "expert_ffn: 8}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nparallel: {ep: 4}\n")
    with pytest.raises(ConfigError) as err:
        C.load(child)
    assert str(err.value).startswith(f"{child}: parallel.ep:")
    bad = write(tmp_path, "bad.yaml", "base: base.yaml\nmodel: {hidden_size: 0}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.hidden_size: must be > 0"):
        C.load(bad)


def test_unknown_section_and_cycles_and_missing_base(tmp_path):
    with pytest.raises(ConfigError, match=r"trainng: unknown key \(valid: model, moe"):
        C.load(write(tmp_path, "a.yaml", "trainng: {max_steps: 3}\n"))
    write(tmp_path, "x.yaml", "base: y.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle y.yaml -> x.yaml -> y.yaml"):
        C.load(write(tmp_path, "y.yaml", "base: x.yaml\n"))
    with pytest.raises(ConfigError, match="nope.yaml: no such config file or preset"):
        C.load(write(tmp_path, "b.yaml", "base: nope.yaml\n"))


def test_dump_round_trips(tmp_path):
    cfg = C.load(TINY_MOE, ["moe.layer_freq=[0,1,0,1]"])
    again = C.load(write(tmp_path, "resolved.yaml", C.dump(cfg)))
    assert again == cfg


def test_moe_layer_rule_follows_hugging_face():
    cfg = C.load(TINY_MOE, ["moe.layer_freq=2"])
    # HF Qwen2-MoE: layer i is sparse when (i + 1) % decoder_sparse_step == 0
    assert cfg.moe.moe_layers(4) == [0, 1, 0, 1]


def test_precision_aware_optimizer_needs_the_distributed_optimizer():
    with pytest.raises(ConfigError, match="optimizer.precision_aware: needs "
                                          "optimizer.distributed=true"):
        C.load(TINY_MOE, ["optimizer.precision_aware=true", "optimizer.distributed=false",
                          "training.precision=bf16"])
    cfg = C.load(TINY_MOE, ["optimizer.precision_aware=true", "training.precision=bf16",
                            "optimizer.exp_avg_dtype=bf16", "optimizer.exp_avg_sq_dtype=bf16",
                            "optimizer.main_grads_dtype=bf16"])
    assert (cfg.optimizer.exp_avg_dtype, cfg.optimizer.main_grads_dtype) == ("bf16", "bf16")
    # the remainders only with the precision-aware optimizer; checkpoints hold fp32 masters
    with pytest.raises(ConfigError, match="optimizer.store_param_remainders: needs "
                                          "optimizer.precision_aware=true"):
        C.load(TINY_MOE, ["optimizer.store_param_remainders=true", "training.precision=bf16"])
    assert C.load(TINY_MOE, ["optimizer.precision_aware=true", "training.precision=bf16",
                             "optimizer.store_param_remainders=true"]
                  ).optimizer.store_param_remainders
