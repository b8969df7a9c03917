"""The router registry: names, parameters, user classes by dotted path, and one-line errors
before anything starts.

Run: pytest tests/routers/test_registry.py
"""

import pytest

from moe_lab import config as C
from moe_lab.config import ConfigError
from moe_lab.routers import resolve_router
from moe_lab.testing import run_cli

from ..conftest import TINY_MOE


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        resolve_router({"name": "topk"})
    assert str(err.value).startswith("moe.router.name: unknown router 'topk' (valid: "
                                     "expert_choice, group_limited, hash, random, sinkhorn, ")
    assert "\n" not in str(err.value)


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"moe.router.capacity: unknown parameter of router "
                                          r"expert_choice \(valid: capacity_factor\)"):
        resolve_router({"name": "expert_choice", "capacity": 2})


def test_bad_parameter_value_is_one_line():
    with pytest.raises(ConfigError, match="moe.router: order must be one of softmax_topk"):
        resolve_router({"name": "topk_softmax", "order": "mixtral"})


def test_a_users_class_by_dotted_path_with_its_own_params():
    choice = resolve_router({"name": "tests.routers.crafted:CraftedRouter", "weight": 0.25})
    assert choice.params.weight == 0.25 and choice.builder().func.__name__ == "CraftedRouter"
    with pytest.raises(ConfigError, match="moe.router.bias: unknown parameter of router "
                                          "tests.routers.crafted:CraftedRouter"):
        resolve_router({"name": "tests.routers.crafted:CraftedRouter", "bias": 1})


def test_a_megatron_router_class_by_dotted_path_takes_no_params():
    choice = resolve_router({"name": "megatron.core.transformer.moe.router:TopKRouter"})
    assert choice.builder().__name__ == "TopKRouter"


def test_dotted_path_that_does_not_import_is_one_line():
    with pytest.raises(ConfigError, match=r"moe.router.name: cannot import 'no_such.mod:X'"):
        resolve_router({"name": "no_such.mod:X"})


def test_experiment_checks_name_the_key():
    cfg = C.load(TINY_MOE, ["moe.router.name=hash", "moe.balance.aux=0",
                            "training.recompute=full"])
    with pytest.raises(ConfigError, match="^training.recompute: the hash router") as err:
        resolve_router(cfg.moe.router, cfg)
    assert err.value.key == "training.recompute"


def test_cli_refuses_before_starting_and_writes_nothing(tmp_path):
    result = run_cli(["train", TINY_MOE, "--run-dir", str(tmp_path / "run"),
                      "moe.router.name=hash"])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "moe-lab: error: moe.balance.aux: router hash does not take this loss (it takes: none); "
        "set moe.balance.aux=0")
    assert not (tmp_path / "run").exists()
