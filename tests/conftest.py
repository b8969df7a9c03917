"""Shared fixtures. Tests run on the CPU; multi-process tests start real torchrun ranks."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from moe_lab.testing import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY_MOE = str(REPO / "experiments" / "tiny_moe.yaml")
TINY_DENSE = str(REPO / "experiments" / "tiny_dense.yaml")


def pytest_configure(config):
    # Started from a background job without job control (`cmd &` in a script), pytest inherits
    # SIGINT ignored, and so would every process the tests start: the Ctrl-C tests (data
    # prepare, moe-lab ui, the README's demo) would see their SIGINT dropped. A handler is
    # reset to the default at exec, an ignored signal is not.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _reset_megatron_aux_loss_scale():
    """megatron keeps the MoE aux-loss gradient scale in a class attribute, created by whoever
    sets it first: a backward outside its schedules (model and router tests) leaves a 0-d tensor
    that the schedules' later [1]-shaped copy_ rejects. Each in-process test starts without it."""
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A run directory holding a 2-step checkpoint of the tiny MoE, for layouts to continue."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    result = run_cli(["train", TINY_MOE, "--run-dir", str(run_dir), "training.max_steps=2",
                      "optimizer.warmup_steps=0", "tracking.enabled=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def world():
    """A one-rank gloo world with megatron's parallel state, for in-process model tests (each
    test module gets its own, and its own MoE metrics tracker: megatron's is process-global and
    sized by the first model's layer count)."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from moe_lab import config as C
    from moe_lab.compat import enable_cpu_compat
    from moe_lab.launch.distributed import detect_env, init_distributed, shutdown_distributed

    enable_cpu_compat()
    init_distributed(C.load(TINY_MOE), detect_env({}), use_gpu=False)
    yield
    shutdown_distributed()
    destroy_moe_metrics_tracker()
