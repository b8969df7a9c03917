"""`moe-lab upcycle` end to end: real dense checkpoints in, dist_checkpointing MoE checkpoints
out, loaded back into megatron GPTModels in this process (a world of one, gloo, CPU) and run.

- sparse upcycling with renormalised top-k computes the dense model's logits (1e-5, fp32);
- granular upcycling with the virtual-group router sends every token to exactly T/G copies of
  every shard, and the output deviation from the dense model with and without weight scaling is
  printed (pytest -s) and compared;
- the same seed gives the same tensors (compared as tensors: the files differ by a save id);
- bad input is refused in one line before anything is written;
- an upcycled model trains under EP=2 (two torchrun ranks) with falling loss.
Run: pytest -s tests/upcycle/test_checkpoints.py
"""

import json

import pytest
import torch

from moe_lab import config as C
from moe_lab.testing import run_cli, run_distributed
from moe_lab.tracking import read_metrics
from moe_lab.train.checkpoint import latest_checkpoint, load_checkpoint
from moe_lab.upcycle.template import build_uninitialised

from ..conftest import TINY_MOE

QWEN2 = ["--method", "qwen2", "--num-experts", "8", "--expert-ffn", "40", "--topk", "2",
         "--shared-ffn", "64", "--seed", "3"]


def upcycle(dense_run, out, *flags):
    result = run_cli(["upcycle", "--from", str(dense_run), "--to", str(out), *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "upcycle_report.json").read_text())


def load(run_or_out, config_file):
    cfg = C.load(config_file)
    model = build_uninitialised(cfg)
    load_checkpoint(latest_checkpoint(run_or_out), model)
    return cfg, model.eval()


def tokens(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.model.vocab_size, (2, cfg.training.seq_length), generator=gen)
    return ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)


def logits(model, cfg):
    with torch.no_grad():
        return model(*tokens(cfg), None)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_sparse_with_renormalised_topk_gives_the_dense_logits(world, dense_run, tmp_path):
    """Mixed dense and MoE layers (layer_freq 2) on the way: dense layers are copied."""
    out = tmp_path / "sparse"
    report = upcycle(dense_run, out, "--method", "sparse", "--num-experts", "4",
                     "--expert-ffn", "128", "--topk", "2", "--shared-ffn", "0",
                     "moe.router.norm_topk_prob=true", "moe.layer_freq=2")
    assert report["weight_scale"] == 1.0 and report["moe_layers"] == [1, 3]
    dense_cfg, dense = load(dense_run, dense_run / "config.yaml")
    moe_cfg, moe = load(out, out / "upcycled.yaml")
    assert type(moe.decoder.layers[1].mlp).__name__ == "MoELayer"
    torch.testing.assert_close(logits(moe, moe_cfg), logits(dense, dense_cfg),
                               rtol=1e-5, atol=1e-5)


def _mlp_outputs(model, cfg):
    """Layer 0's MLP output (same input in the dense and the upcycled model) and routing."""
    seen = {}
    layer = model.decoder.layers[0]
    # A clone: the layer adds the residual into the MLP's output tensor in place afterwards.
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o: seen.update(mlp=o[0].clone()))]
    if hasattr(layer.mlp, "router"):
        for index, lay in enumerate(model.decoder.layers):
            hooks.append(lay.mlp.router.register_forward_hook(
                lambda m, i, o, index=index: seen.update({f"routing_{index}": o[1]})))
    out = logits(model, cfg)
    for hook in hooks:
        hook.remove()
    return out, seen


def test_granular_virtual_group_routes_to_every_shard_equally(world, dense_run, tmp_path):
    flags = ["--method", "granular", "--num-experts", "8", "--expert-ffn", "32", "--topk", "4",
             "--shared-ffn", "0"]
    scaled = upcycle(dense_run, tmp_path / "scaled", *flags)
    unscaled = upcycle(dense_run, tmp_path / "unscaled", *flags, "--weight-scale", "1")
    assert scaled["router_init"] == "virtual-group" and scaled["granularity"] == 4
    assert scaled["weight_scale"] == pytest.approx(2.0)  # cbrt(N*G/T) = cbrt(8*4/4)
    dense_cfg, dense = load(dense_run, dense_run / "config.yaml")
    dense_logits, dense_seen = _mlp_outputs(dense, dense_cfg)
    deviation = {}
    for name, report in (("scaled", scaled), ("unscaled", unscaled)):
        out = tmp_path / name
        cfg, model = load(out, out / "upcycled.yaml")
        moe_logits, seen = _mlp_outputs(model, cfg)
        for layer in report["layers"]:
            shard = torch.tensor([e["shard"] for e in layer["experts"]])
            routing = seen[f"routing_{layer['layer']}"]  # [tokens, experts] bool
            per_shard = torch.stack([routing[:, shard == g].sum(1) for g in range(4)], 1)
            assert (per_shard == 4 // 4).all(), layer["layer"]  # T/G copies of every shard
        deviation[name] = (relative(seen["mlp"], dense_seen["mlp"]),
                           relative(moe_logits, dense_logits))
    print(f"\ngranular N=8 G=4 T=4, relative deviation from the dense model at step 0 "
          f"(layer-0 MLP output, logits): with weight scaling {deviation['scaled'][0]:.4f}, "
          f"{deviation['scaled'][1]:.4f}; without {deviation['unscaled'][0]:.4f}, "
          f"{deviation['unscaled'][1]:.4f}")
    assert deviation["scaled"][0] < deviation["unscaled"][0]
    assert deviation["scaled"][1] < deviation["unscaled"][1]


def test_bad_input_is_refused_in_one_line_before_writing(dense_run, tmp_path):
    refused = run_cli(["upcycle", "--from", str(dense_run), "--to", str(tmp_path / "a"),
                       "--method", "granular", "--num-experts", "8", "--expert-ffn", "48",
                       "--topk", "2"])
    assert refused.returncode == 2 and not (tmp_path / "a").exists()
    assert refused.stderr.strip().splitlines()[-1].startswith("moe-lab: error: ")
    assert "moe.expert_ffn: granular upcycling needs an integer granularity" in refused.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    refused = run_cli(["upcycle", "--from", str(dense_run), "--to", str(taken), *QWEN2])
    assert refused.returncode == 2 and "already exists and is not empty" in refused.stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def qwen2_out(dense_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2") / "out"
    return out, upcycle(dense_run, out, *QWEN2)


@pytest.fixture(scope="module")
def ep2_run(dense_run, tmp_path_factory):
    """The same qwen2 settings given as config keys to `moe-lab train` under EP=2."""
    run_dir = tmp_path_factory.mktemp("ep2") / "run"
    result = run_distributed(2, [
        "train", TINY_MOE, "--run-dir", str(run_dir), "parallel.ep=2",
        f"upcycle.source={dense_run}", "upcycle.method=qwen2", "moe.expert_ffn=40",
        "moe.topk=2", "moe.shared_expert_ffn=64", "upcycle.seed=3",
        "training.max_steps=12", "optimizer.warmup_steps=2", "training.log_interval=1"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"initialised weights from {run_dir / 'upcycled'}" in result.stdout
    return run_dir


@pytest.mark.slow
def test_upcycled_model_trains_under_ep2_with_falling_loss(ep2_run):
    rows = read_metrics(ep2_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    losses = [r["loss/lm"] for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    report = json.loads((ep2_run / "upcycled" / "upcycle_report.json").read_text())
    assert report["method"] == "qwen2" and report["reinit_fraction_mean"] == 0.5


@pytest.mark.slow
def test_same_seed_gives_the_same_tensors(world, qwen2_out, ep2_run):
    """The CLI run and the training run's own upcycling, same settings: identical tensors."""
    out, report = qwen2_out
    _, first = load(out, out / "upcycled.yaml")
    _, second = load(ep2_run / "upcycled", out / "upcycled.yaml")
    a, b = first.state_dict(), second.state_dict()
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 100
    assert all(torch.equal(a[k], b[k]) for k in tensors)
    assert report["layers"][0]["experts"][3]["segments"][0]["copy"] == 0
    assert report["layers"][0]["experts"][3]["segments"][1]["copy"] == 1  # 3*40 .. 4*40 > 128


def test_routers_with_an_expert_bias_start_from_an_upcycled_checkpoint(qwen2_out, tmp_path):
    """The upcycled checkpoint has no expert bias (balancing state, not a weight): a run with
    moe.router.expert_bias starts it at zero instead of failing on the missing tensor."""
    out, _ = qwen2_out
    result = run_cli(["train", str(out / "upcycled.yaml"), "--run-dir", str(tmp_path / "bias"),
                      "moe.router.expert_bias=true", "moe.balance.aux=0",
                      "training.max_steps=2", "optimizer.warmup_steps=0",
                      "tracking.enabled=false", "checkpoint.enabled=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised weights from {out / 'checkpoints' / 'step_0000000'}" in result.stdout


def test_a_dense_checkpoint_as_init_from_of_an_moe_is_refused_in_one_line(dense_run, tmp_path):
    result = run_cli(["train", TINY_MOE, "--run-dir", str(tmp_path / "r"),
                      f"checkpoint.init_from={dense_run}"])
    assert result.returncode == 2 and not (tmp_path / "r").exists()
    assert result.stderr.strip() == (
        f"moe-lab: error: checkpoint.init_from: moe.num_experts is 0 in "
        f"{dense_run / 'checkpoints' / 'step_0000004'} but 8 in the config (a dense checkpoint "
        f"becomes an MoE with `moe-lab upcycle`, docs/upcycling.md)")
