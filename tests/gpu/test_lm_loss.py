"""One GPU: the fused output layer + cross-entropy (model/lm_loss.py, its chunk pass compiled by
torch.compile) against the unfused computation, at Qwen's vocabulary size in bf16.

Run: pytest tests/gpu/test_lm_loss.py -s
"""

import pytest
import torch

from moe_lab.model import lm_loss

from .conftest import needs_gpus, report


@needs_gpus(1)
def test_fused_loss_and_gradients_match_unfused_in_bf16():
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden_size, vocab = 8192, 2048, 151936  # 3 chunks
    hidden = (torch.randn(tokens, hidden_size, device="cuda", generator=gen)
              .bfloat16().requires_grad_())
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * 0.02
              ).bfloat16().requires_grad_()
    labels = torch.randint(vocab, (tokens,), device="cuda", generator=gen)
    mask = torch.ones(tokens, device="cuda")

    loss = lm_loss.LinearCrossEntropy.apply(hidden, weight, labels, mask)
    (loss.sum() / tokens).backward()
    fused = loss.detach(), hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    ref_loss = lm_loss.linear_cross_entropy_reference(hidden, weight, labels)
    (ref_loss.sum() / tokens).backward()
    ref = ref_loss.detach(), hidden.grad, weight.grad

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    errors = {"loss": rel(fused[0], ref[0]), "grad_hidden": rel(fused[1], ref[1]),
              "grad_weight": rel(fused[2], ref[2]),
              "mean_loss": [float(fused[0].mean()), float(ref[0].mean())]}
    report("fused_lm_loss_vs_unfused_bf16", errors)
    assert errors["loss"] < 1e-3  # both fp32 over the same bf16 logits, up to GEMM order
    assert errors["grad_hidden"] < 1e-2 and errors["grad_weight"] < 1e-2  # bf16 rounding
    assert errors["mean_loss"][0] == pytest.approx(errors["mean_loss"][1], rel=1e-4)
