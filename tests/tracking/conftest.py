"""Fixtures for the tracking tests: a real `mlflow server` on a free loopback port (one worker),
and sinks driven directly for runs that need no training."""

from __future__ import annotations

import io

import numpy as np
import pytest

from moe_lab import config as config_lib
from moe_lab.testing.mlflow_server import mlflow_server

from ..conftest import TINY_MOE


@pytest.fixture(scope="session")
def server_url(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as url:
        yield url


@pytest.fixture
def client(server_url):
    from moe_lab.tracking.store import MlflowClient

    return MlflowClient(server_url)


def make_sink(run_dir, *overrides, tags=None):
    """An MlflowSink for the tiny MoE config, its messages kept in sink.out / sink.err."""
    from moe_lab.tracking.mlflow_sink import MlflowSink

    cfg = config_lib.load(TINY_MOE, ["optimizer.warmup_steps=1", *overrides])
    out, err = io.StringIO(), io.StringIO()
    sink = MlflowSink(cfg, run_dir, tags or {"host": "test"}, stream=out, warnings=err)
    sink.out, sink.err = out, err
    return sink


def fake_step_metrics(step: int, lr: float, layers=(0, 1, 2, 3)) -> dict[str, float]:
    """A metrics dict shaped like the loop's (with per-layer MoE telemetry), values that fall
    faster for larger lr: enough to tell runs apart in plots and tables."""
    loss = 1.5 + 4.0 * np.exp(-lr * 40 * step)
    metrics = {"loss": loss, "loss/lm": loss - 0.01, "loss/aux": 1.0 + 0.2 / step,
               "grad_norm": 1.0 / step, "lr": lr, "throughput/tokens_per_s": 4000.0,
               "eta_s": 1.0, "step_time_s": 0.1}
    for layer in layers:
        imbalance = 1.0 + (1.0 + layer * 0.3) * lr * 200 / np.sqrt(step)
        metrics[f"moe/layer_{layer:02d}/load_max_over_mean"] = imbalance
        metrics[f"moe/layer_{layer:02d}/load_cv"] = (imbalance - 1) / 2
        metrics[f"moe/layer_{layer:02d}/entropy"] = 2.0
    return metrics


def fake_expert_load(seed: int, layers: int = 4, experts: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=1.0 + seed, size=(layers, experts)) * 1000
