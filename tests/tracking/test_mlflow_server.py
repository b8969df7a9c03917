"""Runs reach a real `mlflow server` (started on a free loopback port by the fixture): params,
metrics with steps, tags, artifacts, parent/child runs; resume appends to the same run; a server
that is down or dies leaves training running and a journal that `moe-lab tracking sync` uploads.

Run: pytest tests/tracking/test_mlflow_server.py
"""

import re
import urllib.request

import numpy as np
import pytest
import yaml

from moe_lab.config import ConfigError
from moe_lab.testing import run_cli
from moe_lab.testing.distributed import free_port
from moe_lab.testing.mlflow_server import mlflow_server
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE
from .conftest import fake_expert_load, fake_step_metrics, make_sink

TRAIN = ["training.max_steps=6", "training.log_interval=1", "optimizer.warmup_steps=1",
         "checkpoint.interval=3"]


def train(run_dir, *extra):
    result = run_cli(["train", TINY_MOE, "--run-dir", str(run_dir), *TRAIN, *extra],
                     cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_training_run_and_its_resume_are_one_mlflow_run(server_url, client, tmp_path):
    run_dir = tmp_path / "run"
    uri = [f"tracking.uri={server_url}", "tracking.experiment=train_and_resume"]
    first = train(run_dir, *uri, "--stop-at-step", "3")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert f"logging to run {run_id}" in first.stdout
    assert client.get_run(run_id).info.status == "KILLED"  # stopped early: not finished
    assert [s for s, _ in history(client, run_id, "loss")] == [1, 2, 3]

    second = train(run_dir, *uri)
    assert f"appending to run {run_id}" in second.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert history(client, run_id, "loss") == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [s for s, _ in history(client, run_id, "grad_norm")] == list(range(1, 7))
    assert "eta_s" not in run.data.metrics
    params = run.data.params
    assert (params["model.hidden_size"], params["moe.router.name"], params["moe.num_experts"]) \
        == ("64", "topk_softmax", "8")
    assert int(params["derived.total_params"]) > 0 and "tracking.uri" not in params
    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git.commit"]) and tags["git.dirty"] in ("true",
                                                                                       "false")
    assert tags["mlflow.source.git.commit"] == tags["git.commit"]
    assert (tags["parallel.layout"], tags["gpu.count"], tags["world_size"]) == \
        ("tp1-pp1-ep1-etp1-cp1", "0", "1")
    assert tags["host"] and tags["resumed_from_step"] == "3"
    assert tags["checkpoint.latest"].endswith("checkpoints/step_0000006")
    assert tags["moe.layer_numbers"] == "0,1,2,3"
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "checkpoints.txt"} <= artifacts
    config = yaml.safe_load(open(client.download_artifacts(run_id, "config.yaml", str(tmp_path))))
    assert config["moe"]["num_experts"] == 8 and config["training"]["max_steps"] == 6
    listing = open(client.download_artifacts(run_id, "checkpoints.txt", str(tmp_path))).read()
    assert "step_0000003" in listing and "step_0000006" in listing
    experiment = client.get_experiment_by_name("train_and_resume")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_sweep_children_arrive_under_their_parent(server_url, client, tmp_path):
    experiment = client.create_experiment("sweep_children")
    parent = client.create_run(experiment, run_name="lr_sweep").info.run_id
    lrs = {"a": 1e-3, "b": 3e-3, "c": 1e-2}
    for name, lr in lrs.items():
        sink = make_sink(tmp_path / name, f"tracking.uri={server_url}",
                         "tracking.experiment=sweep_children", f"tracking.parent_run_id={parent}",
                         "tracking.sweep_id=sw42", f"tracking.run_name=lr-{name}",
                         f"optimizer.lr={lr}", "training.max_steps=5",
                         "tracking.expert_load_interval=2")
        sink.start(0)
        for step in range(1, 6):
            sink.log(step, fake_step_metrics(step, lr))
            logged = sink.log_expert_load(step, fake_expert_load(step))
            assert logged == (step in (2, 4, 5))  # every 2 steps and the last
        sink.log(5, {"valid/loss": 2.5}, split="valid")
        sink.close()
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["lr-a", "lr-b", "lr-c"]
    for run in children:
        lr = lrs[run.info.run_name[-1]]
        assert float(run.data.params["optimizer.lr"]) == lr
        assert run.data.tags["sweep_id"] == "sw42" and run.info.status == "FINISHED"
        assert [s for s, _ in history(client, run.info.run_id, "moe/layer_02/load_cv")] == \
            [1, 2, 3, 4, 5]
        assert history(client, run.info.run_id, "valid/loss") == [(5, 2.5)]
        files = {f.path for f in client.list_artifacts(run.info.run_id, "expert_load")}
        assert files == {f"expert_load/step_000000{s}.{ext}" for s in (2, 4, 5)
                         for ext in ("npy", "png")}
        local = client.download_artifacts(run.info.run_id, "expert_load/step_0000005.npy",
                                          str(tmp_path))
        np.testing.assert_array_equal(np.load(local), fake_expert_load(5))
        png = client.download_artifacts(run.info.run_id, "expert_load/step_0000005.png",
                                        str(tmp_path))
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_batches_stay_within_mlflow_limits(server_url, client):
    from moe_lab.tracking import store

    run_id = client.create_run(client.create_experiment("limits")).info.run_id
    metrics = [store.Metric(f"m/{i:04d}", float(i), 0, 1) for i in range(2500)]
    params = [store.Param(f"p{i:03d}", str(i)) for i in range(250)]
    tags = [store.RunTag(f"t{i:03d}", str(i)) for i in range(150)]
    # The server refuses a request over 1000 metrics / 100 params / 100 tags.
    assert store.log_batch(client, run_id, metrics, params, tags) == 3 + 3 + 2
    data = client.get_run(run_id).data
    assert (len(data.metrics), len(data.params), len(data.tags) >= 150) == (2500, 250, True)


def test_unknown_parent_or_resumed_run_is_a_one_line_error(server_url, tmp_path):
    missing = "deadbeef" * 4
    with pytest.raises(ConfigError, match=rf"^tracking.parent_run_id: MLflow run {missing} "):
        make_sink(tmp_path / "a", f"tracking.uri={server_url}", f"tracking.parent_run_id={missing}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mlflow_run_id").write_text("f" * 32 + "\n")
    with pytest.raises(ConfigError, match=r"^tracking.uri: MLflow run f{32} is not in "):
        make_sink(tmp_path / "b", f"tracking.uri={server_url}")
    assert (tmp_path / "b" / "mlflow_run_id").read_text().strip() == "f" * 32  # left as it was


def test_server_down_training_finishes_and_sync_uploads_later(server_url, client, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    result = train(run_dir, f"tracking.uri={down}", "tracking.experiment=offline",
                   "tracking.run_name=offline-run")
    assert result.stderr.count("MLflow tracking unavailable") == 1
    assert "step 6/6" in result.stdout and (run_dir / "mlflow_offline.jsonl").is_file()
    assert not (run_dir / "mlflow_run_id").exists()
    still_down = run_cli(["tracking", "sync", str(run_dir)])  # to the store it was logging to
    assert still_down.returncode == 2 and f"{down} does not answer" in still_down.stderr

    # The store moved (or came back elsewhere): --uri names it. (The next test syncs to the
    # journal's own URI once the server there is back.)
    synced = run_cli(["tracking", "sync", str(run_dir), "--uri", server_url])
    assert synced.returncode == 0, synced.stderr[-3000:]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert f"into run {run_id} at {server_url}" in synced.stdout
    run = client.get_run(run_id)
    assert run.info.run_name == "offline-run" and run.info.status == "FINISHED"
    assert run.data.params["training.max_steps"] == "6" and run.data.tags["gpu.count"] == "0"
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert history(client, run_id, "loss") == [(r["step"], pytest.approx(r["loss"]))
                                               for r in rows]
    assert {"config.yaml", "checkpoints.txt"} <= {f.path for f in client.list_artifacts(run_id)}
    again = run_cli(["tracking", "sync", str(run_dir), "--uri", server_url])
    assert again.returncode == 2 and "no offline MLflow records" in again.stderr
    assert not (run_dir / "mlflow_offline.jsonl").exists()
    assert len(list(run_dir.glob("mlflow_offline.synced-*.jsonl"))) == 1  # kept, renamed


def test_server_dying_mid_run_keeps_the_rest_for_sync(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    with mlflow_server(tmp_path / "server", port=port):
        sink = make_sink(run_dir, f"tracking.uri={url}", "training.max_steps=6")
        sink.start(0)
        for step in (1, 2, 3):
            sink.log(step, fake_step_metrics(step, 3e-3))
        sink.flush()
        run_id = sink.run_id
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)
    for step in (4, 5, 6):
        sink.log(step, fake_step_metrics(step, 3e-3))
    sink.log_expert_load(6, fake_expert_load(6))
    sink.close()
    assert sink.err.getvalue().count("MLflow tracking unavailable") == 1
    assert "moe-lab tracking sync" in sink.err.getvalue()

    with mlflow_server(tmp_path / "server", port=port):
        synced = run_cli(["tracking", "sync", str(run_dir)])
        assert synced.returncode == 0, synced.stderr[-3000:]
        from moe_lab.tracking.store import MlflowClient

        client = MlflowClient(url)
        assert [s for s, _ in history(client, run_id, "loss")] == [1, 2, 3, 4, 5, 6]
        assert client.get_run(run_id).info.status == "FINISHED"
        files = {f.path for f in client.list_artifacts(run_id, "expert_load")}
        assert files == {"expert_load/step_0000006.npy", "expert_load/step_0000006.png"}
