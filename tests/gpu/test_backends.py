"""One GPU: the torch backend (grouped-GEMM experts, SDPA attention) computes what megatron's
local backend computes, in bf16, from the same checkpoint; so does the te backend (TE's layers,
fused RoPE and fused token permutation) where Transformer Engine is installed.

Run: pytest tests/gpu/test_backends.py -s
"""

import importlib.util

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
def test_fast_backends_match_the_local_backend_in_bf16(tmp_path):
    base = tmp_path / "base"
    result = run_cli(["train", TINY_MOE, "--run-dir", str(base), "training.max_steps=2", *COMMON])
    assert result.returncode == 0, result.stderr[-3000:]
    curves = {}
    te = importlib.util.find_spec("transformer_engine") is not None
    # with TE, the torch backend takes TE's fused RoPE; "torch_unfused" is it with megatron's
    # and "torch_flash" is it with torch's FlashAttention-2 instead of cuDNN's attention
    backends = ("local", "torch", "torch_flash") + (("torch_unfused", "te") if te else ())
    variants = {"torch_unfused": ["model.backend=torch", "model.rope_fusion=false"],
                "torch_flash": ["model.backend=torch", "model.attention_backend=flash"]}
    for backend in backends:
        run = tmp_path / backend
        extra = variants.get(backend, [f"model.backend={backend}"])
        result = run_cli(["train", TINY_MOE, "--run-dir", str(run), "training.max_steps=3",
                          *extra, f"checkpoint.init_from={base}", *COMMON])
        assert result.returncode == 0, result.stderr[-3000:]
        curves[backend] = read_metrics(run / "metrics.jsonl")
    first_loss = [curves[b][0]["loss/lm"] for b in backends]
    first_grad = [curves[b][0]["grad_norm"] for b in backends]
    report("torch_vs_local_bf16", {"backends": backends, "loss/lm step 1": first_loss,
                                   "grad_norm step 1": first_grad})
    # Same weights and tokens: the forward differs only by bf16 rounding order.
    for loss, grad in zip(first_loss[1:], first_grad[1:]):
        assert loss == pytest.approx(first_loss[0], rel=1e-2)
        assert grad == pytest.approx(first_grad[0], rel=5e-2)


@needs_gpus(1)
@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="TE's fused RoPE needs Transformer Engine")
def test_torch_backend_takes_te_fused_rope_where_te_is_installed():
    from moe_lab import config as C
    from moe_lab.model import build_transformer_config

    def fused(*overrides, cpu=False):
        cfg = C.load(TINY_MOE, ["model.backend=torch", *overrides])
        return build_transformer_config(cfg, use_cpu_initialization=cpu).apply_rope_fusion

    assert fused()
    assert not fused("model.rope_fusion=false")
    assert not fused(cpu=True)  # the CPU path keeps megatron's RoPE
    assert not fused("model.backend=local")  # the reference stays unfused


@needs_gpus(1)
def test_torch_backend_attention_runs_the_kernel_model_attention_backend_names():
    """auto asks for cuDNN's fused attention first, also with TE imported (which leaves
    torch's own choice on FlashAttention-2, docs/performance.md); flash and fused pin one."""
    import torch
    from megatron.core.transformer.enums import AttnBackend
    from torch.profiler import ProfilerActivity, profile

    from moe_lab import config as C
    from moe_lab.model import build_transformer_config
    from moe_lab.model.attention import SDPACoreAttention

    if importlib.util.find_spec("transformer_engine") is not None:
        import transformer_engine.pytorch  # noqa: F401  (as a te-enabled run has it imported)
    config = build_transformer_config(C.load(TINY_MOE, ["model.backend=torch"]),
                                      use_cpu_initialization=False)
    s, b, n, d = 512, 2, 4, 128
    q, k, v = (torch.randn(s, b, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    ran, outputs = {}, {}
    for name in ("auto", "flash", "fused"):
        config.attention_backend = AttnBackend[name]
        attention = SDPACoreAttention(config, 1, None, softmax_scale=d ** -0.5)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = attention(q, k, v)
            out.float().sum().backward()
        ran[name] = sorted({e.key for e in prof.key_averages()
                            if e.key.startswith("aten::_scaled_dot_product")})
        outputs[name] = out.detach().float()
    report("sdpa_kernels", ran)
    assert "aten::_scaled_dot_product_cudnn_attention" in ran["auto"], ran
    assert "aten::_scaled_dot_product_cudnn_attention" in ran["fused"], ran
    assert "aten::_scaled_dot_product_flash_attention" in ran["flash"], ran
    torch.testing.assert_close(outputs["auto"], outputs["flash"], rtol=2e-2, atol=2e-2)


def _host_wait_behind_a_busy_gpu(moe) -> tuple[float, float]:
    """(host seconds to queue a forward and backward of `moe`, seconds until the GPU finished)
    when the GPU is first kept busy for about a second: a host that waits for the GPU anywhere
    (stream, event or copy synchronisation) returns only after that second."""
    import time

    import torch

    x = torch.randn(256, 2, moe.config.hidden_size, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    moe(x)[0].float().sum().backward()  # warm-up: lazy initialisation, cached allocations
    torch.cuda.synchronize()
    torch.cuda._sleep(2 * 10**9)  # ~1 s of GPU clock cycles
    start = time.perf_counter()
    moe(x)[0].float().sum().backward()
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    return queued, time.perf_counter() - start


@needs_gpus(1)
def test_torch_backend_moe_layer_does_not_wait_for_the_gpu():
    """One expert rank: routing, token sorting, grouped GEMMs and combine, forward and backward,
    are queued without the host waiting for the GPU once. megatron's alltoall dispatcher in the
    same layer waits for the tokens-per-expert counts (the check can fail)."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
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
        model_parallel_cuda_manual_seed(0)  # megatron initialises GPU weights from its tracker
        model = build_model(cfg, build_transformer_config(cfg, use_cpu_initialization=False))
        moe = model.cuda().bfloat16().decoder.layers[0].mlp
        assert isinstance(moe.token_dispatcher, LocalTokenDispatcher)
        local = _host_wait_behind_a_busy_gpu(moe)
        moe.token_dispatcher = MoEAlltoAllTokenDispatcher(
            moe.num_local_experts, moe.local_expert_indices, config=moe.config,
            pg_collection=get_default_pg_collection())
        megatron = _host_wait_behind_a_busy_gpu(moe)
    finally:
        shutdown_distributed()
    report("moe_layer_host_wait_s", {"torch backend (queued, done)": local,
                                     "megatron alltoall (queued, done)": megatron})
    assert local[1] > 0.3 and local[0] < 0.2 * local[1]  # queued long before the GPU was done
    assert megatron[0] > 0.8 * megatron[1]  # waited for the busy GPU
