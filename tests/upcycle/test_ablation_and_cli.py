"""experiments/upcycling_ablation.yaml resolves into valid members; the `upcycle` command-line
surface is frozen; `moe-lab train` refuses bad upcycling settings before writing anything; the
MoE config must keep the dense model's settings.

Run: pytest tests/upcycle/test_ablation_and_cli.py
"""

import pytest
import yaml

from moe_lab import config as C
from moe_lab.config import ConfigError
from moe_lab.launch.cli import build_parser
from moe_lab.launch.upcycle import resolve
from moe_lab.testing import run_cli
from moe_lab.upcycle import make_plan

from ..conftest import REPO, TINY_MOE

ABLATION = REPO / "experiments" / "upcycling_ablation.yaml"


def members():
    sweep = yaml.safe_load(ABLATION.read_text())["sweep"]
    base = ABLATION.parent / sweep["base"]
    for member in sweep["members"]:
        settings = {**sweep["overrides"], **{k: v for k, v in member.items() if k != "name"}}
        yield member["name"], C.load(base, [f"{k}={v}" for k, v in settings.items()])


def test_ablation_members_are_valid_configs_and_plans():
    resolved = dict(members())
    assert list(resolved) == ["from_scratch", "sparse", "granular", "qwen2_reinit0",
                              "qwen2_reinit50"]
    assert resolved["from_scratch"].upcycle.source is None
    plans = {name: make_plan(cfg) for name, cfg in resolved.items() if cfg.upcycle.source}
    assert {name: p.method for name, p in plans.items()} == {
        "sparse": "sparse", "granular": "granular", "qwen2_reinit0": "qwen2",
        "qwen2_reinit50": "qwen2"}
    assert plans["granular"].router_init == "virtual-group" and plans["granular"].granularity == 4
    assert [plans[n].reinit.fraction for n in ("qwen2_reinit0", "qwen2_reinit50")] == [0, 0.5]
    sources = {cfg.upcycle.source for cfg in resolved.values() if cfg.upcycle.source}
    assert sources == {"runs/tiny_dense"}  # the same dense checkpoint for every member
    for cfg in resolved.values():  # the same active routed width as the dense FFN
        assert cfg.moe.topk * cfg.moe.expert_ffn == cfg.model.ffn_hidden_size


def test_upcycle_command_surface_is_frozen():
    commands = build_parser()._subparsers._group_actions[0].choices
    options = {o for a in commands["upcycle"]._actions for o in a.option_strings}
    assert {"--from", "--to", "--method", "--num-experts", "--expert-ffn", "--topk",
            "--shared-ffn", "--reinit-fraction", "--reinit-granularity", "--router-init",
            "--weight-scale", "--shared-gate-init", "--seed", "--config"} <= options


@pytest.mark.parametrize("overrides, expected", [
    (["upcycle.source=runs/x"], "upcycle.method: choose the method"),
    (["upcycle.source={dense}", "upcycle.method=granular", "moe.expert_ffn=48"],
     "moe.expert_ffn: granular upcycling needs an integer granularity"),
])
def test_train_refuses_bad_upcycling_before_writing(overrides, expected, dense_run, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["train", TINY_MOE, "--run-dir", str(run_dir),
                      *[o.format(dense=dense_run) for o in overrides]])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides, key, expected", [
    (["model.hidden_size=32"], "model.hidden_size",
     "model.hidden_size: 32 differs from the dense model's 64"),
    (["checkpoint.init_from=/elsewhere"], "checkpoint.init_from",
     "checkpoint.init_from: upcycling makes the initial weights"),
])
def test_the_moe_must_keep_the_dense_model_and_not_load_another(overrides, key, expected,
                                                                 dense_run):
    with pytest.raises(ConfigError) as err:
        resolve(TINY_MOE, str(dense_run), ["upcycle.method=qwen2", *overrides])
    assert err.value.key == key and expected in str(err.value)
    cfg, source = resolve(TINY_MOE, str(dense_run), ["upcycle.method=qwen2"])
    assert cfg.upcycle.source == str(dense_run) and source.checkpoint.name == "step_0000004"
