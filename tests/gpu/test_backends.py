"""One GPU: the torch backend (grouped-GEMM experts, SDPA attention) computes what megatron's
local backend computes, in bf16, from the same checkpoint.

Run: pytest tests/gpu/test_backends.py -s
"""

import pytest

from moe_lab.testing import run_cli
from moe_lab.tracking import read_metrics

from ..conftest import TINY_MOE
from .conftest import needs_gpus, report

COMMON = ["training.precision=bf16", "training.log_interval=1", "optimizer.warmup_steps=0",
          "model.hidden_size=256", "model.num_attention_heads=8", "model.num_query_groups=4",
          "moe.expert_ffn=128", "moe.shared_expert_ffn=256", "model.ffn_hidden_size=512",
          "training.seq_length=256", "tracking.enabled=false"]


@needs_gpus(1)
def test_torch_backend_matches_local_backend_in_bf16(tmp_path):
    base = tmp_path / "base"
    result = run_cli(["train", TINY_MOE, "--run-dir", str(base), "training.max_steps=2", *COMMON])
    assert result.returncode == 0, result.stderr[-3000:]
    curves = {}
    for backend in ("local", "torch"):
        run = tmp_path / backend
        result = run_cli(["train", TINY_MOE, "--run-dir", str(run), "training.max_steps=3",
                          f"model.backend={backend}", f"checkpoint.init_from={base}", *COMMON])
        assert result.returncode == 0, result.stderr[-3000:]
        curves[backend] = read_metrics(run / "metrics.jsonl")
    first_loss = [curves[b][0]["loss/lm"] for b in ("local", "torch")]
    first_grad = [curves[b][0]["grad_norm"] for b in ("local", "torch")]
    report("torch_vs_local_bf16", {"loss/lm step 1": first_loss, "grad_norm step 1": first_grad})
    # Same weights and tokens: the forward differs only by bf16 rounding order.
    assert first_loss[1] == pytest.approx(first_loss[0], rel=1e-2)
    assert first_grad[1] == pytest.approx(first_grad[0], rel=5e-2)


def _syncs_of_one_moe_layer(moe) -> list[str]:
    """file:line of every synchronising CUDA call in a forward and backward of `moe`."""
    import warnings

    import torch

    x = torch.randn(256, 2, moe.config.hidden_size, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    moe(x)[0].float().sum().backward()  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            moe(x)[0].float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


@needs_gpus(1)
def test_torch_backend_moe_layer_does_not_wait_for_the_host():
    """One expert rank: routing, token sorting, grouped GEMMs and combine, forward and backward,
    without one host synchronisation, so the host can queue ahead of the GPU. megatron's
    alltoall dispatcher in the same layer synchronises (the check can fail)."""
    import torch
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from moe_lab import config as C
    from moe_lab.experts import LocalTokenDispatcher
    from moe_lab.launch.distributed import detect_env, init_distributed, shutdown_distributed
    from moe_lab.model import build_model, build_transformer_config

    cfg = C.load(TINY_MOE, ["model.backend=torch", "training.precision=bf16"])
    init_distributed(cfg, detect_env({}), use_gpu=True)
    try:
        torch.manual_seed(0)
        model = build_model(cfg, build_transformer_config(cfg, use_cpu_initialization=False))
        moe = model.cuda().bfloat16().decoder.layers[0].mlp
        assert isinstance(moe.token_dispatcher, LocalTokenDispatcher)
        local = _syncs_of_one_moe_layer(moe)
        moe.token_dispatcher = MoEAlltoAllTokenDispatcher(
            moe.num_local_experts, moe.local_expert_indices, config=moe.config,
            pg_collection=get_default_pg_collection())
        megatron = _syncs_of_one_moe_layer(moe)
    finally:
        shutdown_distributed()
    report("moe_layer_host_syncs", {"torch backend": local, "megatron alltoall": megatron})
    assert local == []
    assert megatron
