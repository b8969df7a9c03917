"""MoE telemetry: on a crafted routing the counts, imbalance, entropy, dead experts and drops
equal hand-computed values, in one process (through `Trainer`) and identical under EP=1 and
EP=2 (real torchrun runs); the aux-loss-free bias update uses those global counts.

Run: pytest tests/routers/test_telemetry.py
"""

import math

import numpy as np
import pytest
import torch

from moe_lab import config as C
from moe_lab.data import SyntheticTokens, batch_indices
from moe_lab.model import build_model, build_transformer_config
from moe_lab.routers.telemetry import BalanceLosses, RoutingLoad
from moe_lab.testing import run_distributed
from moe_lab.tracking import read_metrics
from moe_lab.train.optim import build_optimizer, build_scheduler, wrap_ddp
from moe_lab.train.step import Trainer

from ..conftest import TINY_DENSE, TINY_MOE

CRAFTED = "tests.routers.crafted:CraftedRouter"
SMALL = ["training.seq_length=32", "training.micro_batch_size=4", "training.global_batch_size=8",
         "optimizer.warmup_steps=0", "moe.balance.aux=0"]
TOKENS = 8 * 32  # one step's global batch
# Crafted routing, dropless: per router call of T tokens experts 0-3 get T/4, 4-5 get T/2.
DROPLESS = np.array([TOKENS // 4] * 4 + [TOKENS // 2] * 2 + [0, 0])
# With capacity factor 1 (capacity T/4 per call) experts 4-5 lose half: 1/4 of all slots.
CAPPED = np.array([TOKENS // 4] * 6 + [0, 0])
ENTROPY = (math.log(8) + math.log(2)) / 2


def test_metrics_of_a_load_matrix_by_hand():
    load = RoutingLoad([1, 3], np.array([[4, 4, 4, 4], [8, 0, 4, 4]]), np.array([0.5, 1.0]),
                       np.array([0.0, 0.25]))
    m = load.metrics()
    assert m["moe/layer_01/load_max_over_mean"] == 1.0 and m["moe/layer_01/load_cv"] == 0.0
    assert m["moe/layer_03/load_max_over_mean"] == 2.0
    assert m["moe/layer_03/load_cv"] == pytest.approx(math.sqrt(8) / 4)
    assert m["moe/layer_03/dead_experts"] == 1 and m["moe/layer_03/dropped_frac"] == 0.25
    assert m["moe/layer_03/entropy"] == 1.0


def test_balance_losses_from_megatrons_tracker_per_layer_without_a_host_read(world):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    tracker.clear()
    for value in (1.0, 1.5):  # two micro-batches: megatron's tracker sums, the reader averages
        tracker.record("load_balancing_loss", torch.tensor(value), layer_number=2, num_layers=3)
        tracker.record("load_balancing_loss", torch.tensor(2 * value), layer_number=3,
                       num_layers=3)
        tracker.record("z_loss", torch.tensor(4 * value), layer_number=3, num_layers=3)
    losses = BalanceLosses(C.BalanceConfig(aux=0.5, z=0.25), num_layers=3,
                           moe_pattern=[0, 1, 1])
    values = losses.queue(num_microbatches=2)
    assert all(isinstance(v, torch.Tensor) for v in values.values())
    assert float(tracker.metrics["load_balancing_loss"].values.abs().sum()) == 0  # taken out
    metrics = losses.metrics({name: v.numpy() for name, v in values.items()})
    assert metrics == {"moe/layer_01/loss/aux": 1.25, "moe/layer_02/loss/aux": 2.5,
                       "moe/layer_01/loss/z": 0.0, "moe/layer_02/loss/z": 5.0,
                       "loss/aux": 1.875, "loss/z": 2.5}
    # coefficient x value, summed over layers: what joins `loss`
    assert float(losses.weighted_sum(values)) == pytest.approx(0.5 * 3.75 + 0.25 * 5.0)


def trainer_for(path, *overrides):
    cfg = C.load(path, [*SMALL, *overrides])
    torch.manual_seed(0)
    config = build_transformer_config(cfg, use_cpu_initialization=True)
    model = wrap_ddp(cfg, config, build_model(cfg, config))
    optimizer = build_optimizer(cfg, config, model)
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    trainer = Trainer(cfg, config, model, optimizer, build_scheduler(cfg, optimizer), data)
    return trainer, [data.batch(i) for i in batch_indices(0, 8, 0, 1, 4)]


def test_trainer_reports_the_crafted_routing_and_keeps_the_load_matrix(world):
    trainer, batches = trainer_for(TINY_MOE, f"moe.router.name={CRAFTED}")
    assert trainer.expert_load is None  # nothing routed yet
    metrics = trainer.step(0, batches)
    assert trainer.expert_load.dtype == np.int64
    assert np.array_equal(trainer.expert_load, np.tile(DROPLESS, (4, 1)))
    for layer in range(4):
        key = f"moe/layer_{layer:02d}"
        assert metrics[f"{key}/load_max_over_mean"] == 2.0
        assert metrics[f"{key}/load_cv"] == pytest.approx(math.sqrt(0.5))
        assert metrics[f"{key}/entropy"] == pytest.approx(ENTROPY)
        assert metrics[f"{key}/dead_experts"] == 2 and metrics[f"{key}/dropped_frac"] == 0.0
    assert 0 < metrics["moe/telemetry_s"] < 1


def test_expert_bias_takes_one_step_from_the_global_counts(world):
    trainer, batches = trainer_for(TINY_MOE, "moe.router.expert_bias=true",
                                   "moe.router.bias_update_rate=0.01")
    trainer.step(0, batches)
    load = trainer.expert_load
    routers = trainer.moe_telemetry.routers
    for row, layer in enumerate(sorted(routers)):
        expected = 0.01 * np.sign(load[row].mean() - load[row])
        assert np.allclose(routers[layer].expert_bias.numpy(), expected)
    assert (load.std(axis=1) > 0).all()  # the untrained router is not perfectly even


def test_a_router_that_does_not_record_itself_is_counted_by_a_hook(world):
    trainer, batches = trainer_for(
        TINY_MOE, "moe.router.name=megatron.core.transformer.moe.router:TopKRouter")
    metrics = trainer.step(0, batches)
    assert (trainer.expert_load.sum(axis=1) == TOKENS * 2).all()
    assert metrics["moe/layer_00/dropped_frac"] == 0.0
    assert math.isnan(metrics["moe/layer_00/entropy"])  # no scores to take an entropy of


def test_dense_model_has_no_expert_load(world):
    trainer, batches = trainer_for(TINY_DENSE)
    metrics = trainer.step(0, batches)
    assert trainer.expert_load is None and not any(k.startswith("moe/") for k in metrics)


@pytest.mark.slow
def test_crafted_routing_is_identical_under_ep1_and_ep2(tmp_path):
    rows = {}
    for ep in (1, 2):
        run_dir = tmp_path / f"ep{ep}"
        result = run_distributed(ep, [
            "train", TINY_MOE, "--run-dir", str(run_dir), *SMALL, f"parallel.ep={ep}",
            f"moe.router.name={CRAFTED}", "moe.capacity_factor=1.0", "training.max_steps=2",
            "training.log_interval=1", "checkpoint.enabled=false"])
        assert result.returncode == 0, result.stderr[-3000:]
        rows[ep] = read_metrics(run_dir / "metrics.jsonl")
    counts = CAPPED.astype(float)
    for ep1, ep2 in zip(rows[1], rows[2]):
        for layer in range(4):
            key = f"moe/layer_{layer:02d}"
            hand = {"load_max_over_mean": counts.max() / counts.mean(),  # 4/3
                    "load_cv": counts.std() / counts.mean(),  # sqrt(1/3)
                    "entropy": ENTROPY, "dead_experts": 2, "dropped_frac": 0.25}
            for name, value in hand.items():
                assert ep1[f"{key}/{name}"] == pytest.approx(value), (key, name)
                assert ep2[f"{key}/{name}"] == ep1[f"{key}/{name}"], (key, name)
