"""One GPU: the fused output layer + cross-entropy (model/lm_loss.py, its chunk pass a Triton row
kernel) against the unfused computation, at Qwen's vocabulary size in bf16; and that kernel
against the same arithmetic compiled by torch.compile (values and time).

Run: pytest tests/gpu/test_lm_loss.py -s
"""

import pytest
import torch

from moe_lab.bench.timing import cuda_event_ms
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


@needs_gpus(1)
def test_row_kernel_matches_compiled_chunk_pass():
    gen = torch.Generator(device="cuda").manual_seed(1)
    vocab = 151936
    rows = lm_loss.chunk_size(16384, vocab)  # one chunk of shape A at micro-batch 4
    logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * 3).bfloat16()
    labels = torch.randint(vocab, (rows,), device="cuda", generator=gen)

    compiled = torch.compile(lm_loss._loss_and_grad, dynamic=False)
    ref_loss, ref_grad = compiled(logits, labels)
    loss, grad = lm_loss._loss_and_grad_rows(logits, labels)
    times = {"compiled_ms": cuda_event_ms(lambda: compiled(logits, labels)),
             "row_kernel_ms": cuda_event_ms(lambda: lm_loss._loss_and_grad_rows(logits, labels))}
    for block, warps in [(2048, 4), (4096, 4), (4096, 16), (8192, 8), (8192, 16)]:
        out_loss = torch.empty(rows, dtype=torch.float32, device="cuda")
        out_grad = torch.empty_like(logits)

        def run(block=block, warps=warps):
            lm_loss._loss_and_grad_kernel[(rows,)](logits, labels, out_loss, out_grad,
                                                   VOCAB=vocab, BLOCK=block, num_warps=warps)
        times[f"block{block}_warps{warps}_ms"] = cuda_event_ms(run)
    errors = {"rows": rows,
              "loss_max_abs": float((loss - ref_loss).abs().max()),
              "grad_max_abs": float((grad.float() - ref_grad.float()).abs().max()),
              "grad_row_sum_max_abs": float(grad.float().sum(1).abs().max()), **times}
    report("lm_loss_row_kernel_vs_compiled", errors)
    assert errors["loss_max_abs"] < 1e-4 * float(ref_loss.abs().max())
    # one bf16 rounding step of values in [-1, 1]
    assert errors["grad_max_abs"] <= 2.0**-8
