"""A plain `moe-lab train` is an MLflow run in the default store of its working directory, at a
logging cost that is a small share of step time; the pieces that need no server.

Run: pytest tests/tracking/test_default_store.py -s   (-s shows the measured overhead)
"""

import os
import re

import numpy as np
import pytest

from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE


def test_default_store_in_cwd_and_logging_overhead(tmp_path):
    result = run_cli(["train", TINY_MOE, "--run-dir", "run", "training.max_steps=30",
                      "training.log_interval=1", "optimizer.warmup_steps=2",
                      "checkpoint.enabled=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    assert (tmp_path / "mlruns.db").is_file()
    assert (tmp_path / "mlartifacts" / "moe-lab" / run_id / "artifacts" / "config.yaml").is_file()
    found = re.search(r"mlflow: (\d+) metric values in (\d+) requests, ([\d.]+) ms logging",
                      result.stdout)
    assert found, result.stdout[-2000:]
    values, requests, logging_ms = int(found[1]), int(found[2]), float(found[3])
    step_time_s = sum(r["step_time_s"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
    share = logging_ms / 1000 / step_time_s
    print(f"\nlogging overhead: {logging_ms:.1f} ms for {values} values in {requests} requests "
          f"over 30 steps = {100 * share:.2f}% of {step_time_s:.2f} s step time")
    assert values >= 30 * 9  # loss, loss/lm, loss/aux, grad_norm, lr, throughput, memory, ...
    assert requests <= 12  # batched: a handful of requests, not one per value or per step
    # A loose bound for 2 shared, noisy cores: this tiny model's ~0.13 s steps give 6.5-11.3%
    # (measured 2026-11-30 before and after that day's loop changes); one request per value
    # would be ~100x that, and `requests` above catches it exactly.
    assert share < 0.20

    from moe_lab.tracking.store import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert len(client.get_metric_history(run_id, "loss")) == 30


def test_telemetry_is_off_wherever_moe_lab_starts_mlflow():
    from moe_lab.tracking import store  # noqa: F401  (importing it sets the variables)
    from moe_lab.tracking.server import server_command, server_env

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and os.environ["DO_NOT_TRACK"] == "true"
    env = server_env({"MLFLOW_DISABLE_TELEMETRY": "false"})
    assert (env["MLFLOW_DISABLE_TELEMETRY"], env["DO_NOT_TRACK"],
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]) == ("true", "true", "false")
    cmd = server_command("sqlite:////data/mlruns.db", 5000)
    assert cmd[cmd.index("--workers") + 1] == "1" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--default-artifact-root") + 1] == "/data/mlartifacts"


def test_params_are_the_flattened_config_without_tracking():
    from moe_lab import config as config_lib
    from moe_lab.tracking.params import run_params

    params = run_params(config_lib.load(TINY_MOE, ["tracking.run_name=x",
                                                   "moe.router.norm_topk_prob=false"]))
    assert params["moe.router.name"] == "topk_softmax"
    assert params["moe.router.norm_topk_prob"] == "false"
    assert params["optimizer.betas"] == "[0.9, 0.95]" and params["moe.capacity_factor"] == "null"
    assert not any(k.startswith("tracking.") for k in params)
    assert 50 < len(params) < 100


def test_expert_load_heatmap_files_and_bad_shape(tmp_path):
    from moe_lab.tracking import expert_load

    counts = np.array([[10, 10, 10, 10], [40, 0, 0, 0]], dtype=float)
    np.testing.assert_allclose(expert_load.fair_share(counts), [[1, 1, 1, 1], [4, 0, 0, 0]])
    npy, png = expert_load.save(tmp_path, 7, counts, [1, 3])
    assert npy.name == "step_0000007.npy" and png.read_bytes()[:4] == b"\x89PNG"
    np.testing.assert_array_equal(np.load(npy), counts)
    with pytest.raises(ValueError, match=r"expected \[moe_layers, experts\], got shape \(4,\)"):
        expert_load.check_matrix(np.ones(4))


def test_tracking_commands_and_options_are_frozen():
    from moe_lab.launch.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    options = {name: {o for a in commands[name]._actions for o in a.option_strings}
               for name in ("ui", "compare")}
    assert {"--port", "--uri"} <= options["ui"]
    assert {"--metric", "--out", "--uri"} <= options["compare"]
    sync = commands["tracking"]._subparsers._group_actions[0].choices["sync"]
    assert "--uri" in {o for a in sync._actions for o in a.option_strings}


@pytest.mark.slow
def test_only_rank_0_logs_a_two_rank_run(tmp_path):
    from moe_lab.testing import run_distributed
    from moe_lab.tracking.store import MlflowClient

    result = run_distributed(2, ["train", TINY_MOE, "--run-dir", "run", "training.max_steps=3",
                                 "training.log_interval=1", "optimizer.warmup_steps=1",
                                 "parallel.ep=2", "checkpoint.enabled=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("moe-lab").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert (run.data.tags["world_size"], run.data.tags["parallel.layout"]) == \
        ("2", "tp1-pp1-ep2-etp1-cp1")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
