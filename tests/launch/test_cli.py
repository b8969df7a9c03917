"""The command-line surface: frozen command names, help, one-line errors without tracebacks.

Run: pytest tests/launch
"""

import argparse

import pytest

from moe_lab.launch.cli import _all_subparsers, build_parser
from moe_lab.launch.distributed import check_layout, detect_env
from moe_lab import config as C
from moe_lab.config import ConfigError
from moe_lab.testing import run_cli

from ..conftest import TINY_MOE


def test_command_names_are_frozen():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "config"} <= set(commands)
    train_options = {o for a in commands["train"]._actions for o in a.option_strings}
    assert {"--run-dir", "--stop-at-step"} <= train_options


def test_every_command_and_option_has_a_one_line_help_and_every_command_an_example():
    parser = build_parser()
    for command in [parser, *_all_subparsers(parser)]:
        assert command.epilog and "example" in command.epilog, f"{command.prog}: no example"
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{command.prog} {choice.dest}: no help"
            else:
                assert action.help, f"{command.prog} {action.option_strings or action.dest}"
    top = run_cli(["--help"])
    assert top.returncode == 0
    for name in ("train", "sweep", "compare", "ui", "upcycle", "convert", "data", "bench"):
        assert f"    {name} " in top.stdout
    assert "bash scripts/demo.sh" in top.stdout


def test_config_show_prints_resolved_config_and_derived_numbers():
    result = run_cli(["config", "show", "qwen1.5-moe-a2.7b", "parallel.ep=4"])
    assert result.returncode == 0, result.stderr
    assert "num_experts: 60" in result.stdout and "ep: 4" in result.stdout
    assert "total parameters:   14.32B" in result.stdout
    assert "experts per EP rank: 15" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["train", TINY_MOE, "model.hidden_sze=3"], "model.hidden_sze: unknown key"),
    (["train", TINY_MOE, "parallel.ep=3"], "parallel.ep: moe.num_experts 8 is not divisible"),
    (["train", TINY_MOE, "training.precision=bf16"], "training.precision: bf16 needs a GPU"),
    (["train", TINY_MOE, "optimizer.update_impl=triton"], "optimizer.update_impl: triton needs a GPU"),
    (["config", "show", "no-such-preset"], "no-such-preset: no such config file or preset"),
    (["config", "show", TINY_MOE, "moe.router.name=top2"], "moe.router.name: unknown router"),
    (["sweep", "no-such-sweep.yaml"], "no-such-sweep.yaml: no such sweep file"),
    (["sweep", TINY_MOE], "a sweep file holds one mapping, `sweep:`"),
    (["eval", "no-such-run"], "no-such-run: not a run directory"),
    (["compare", "lr_demo"], "mlruns.db does not exist"),
    (["ui", "--port", "99999"], "--port: must be 1-65535, got 99999"),
    (["ui", "--uri", "no-such-dir/x.db"], "no-such-dir/x.db does not exist"),
    (["data", "prepare", "--input", "no/*.jsonl", "--format", "jsonl", "--tokenizer", "t",
      "--out", "d"], "--input: no file matches 'no/*.jsonl'"),
    (["upcycle", "--from", "no-such-run", "--to", "out", "--method", "qwen2",
      "--num-experts", "4", "--expert-ffn", "16", "--topk", "2"], "is not a directory"),
    (["convert", "hf-to-mcore", "no-such-model", "out"], "no-such-model/config.json: not found"),
])
def test_user_mistakes_are_one_line_without_traceback(args, expected, tmp_path):
    result = run_cli([*args[:2], *(["--run-dir", str(tmp_path / "r")] if args[0] == "train"
                                   else []), *args[2:]], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path):
    for args in (["--debug", "train", TINY_MOE, "model.hidden_sze=3"],
                 ["train", TINY_MOE, "model.hidden_sze=3", "--debug"]):
        result = run_cli([*args, "--run-dir", str(tmp_path / "r")])
        assert result.returncode != 0
        assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_layout_must_fit_the_world_before_any_process_group():
    cfg = C.load(TINY_MOE, ["parallel.tp=2", "parallel.ep=2"])
    check_layout(cfg, 4)
    with pytest.raises(ConfigError, match=r"tp\*pp\*cp = 2\*1\*1 = 2 does not divide the world "
                                          r"size 3"):
        check_layout(cfg, 3)
    with pytest.raises(ConfigError, match="global_batch_size: 8 is not a multiple"):
        check_layout(C.load(TINY_MOE, ["training.micro_batch_size=4"]), 4)
    with pytest.raises(ConfigError, match=r"ep\*etp\*pp = 4\*1\*1 does not divide the world size 2"):
        check_layout(C.load(TINY_MOE, ["parallel.ep=4"]), 2)


def test_rank_and_master_come_from_torchrun_or_slurm_variables():
    torchrun = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr,
            torchrun.master_port, torchrun.launcher) == (3, 4, 1, "10.0.0.1", 1234, "torchrun")
    slurm = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                        "SLURM_JOB_ID": "777", "MASTER_ADDR": "node-a"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr,
            slurm.master_port, slurm.launcher) == (5, 8, 1, "node-a", 20777, "slurm")
    assert detect_env({}).launcher == "single"


def test_transformer_engine_parts_are_refused_where_it_is_not_installed():
    import importlib.util

    from moe_lab.launch.run import check_transformer_engine

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here: nothing to refuse")
    torch_backend = C.load(TINY_MOE, ["training.precision=bf16", "model.backend=torch"])
    check_transformer_engine(torch_backend)  # needs nothing from TE
    for overrides, key in ((["model.backend=te"], "model.backend"),
                           (["optimizer.precision_aware=true"], "optimizer.precision_aware")):
        cfg = C.load(TINY_MOE, ["training.precision=bf16", *overrides])
        with pytest.raises(ConfigError) as err:
            check_transformer_engine(cfg)
        assert str(err.value).startswith(f"{key}: ") and "not installed" in str(err.value)
