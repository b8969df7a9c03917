"""Run by tests/model/test_lm_loss.py in a child process with TRITON_INTERPRET=1: the fused LM
loss's Triton row kernel (run by Triton's interpreter on the CPU) against the torch ops it
replaces on the GPU; prints the largest differences as JSON."""

import json
import os

import torch

from moe_lab.model import lm_loss

if __name__ == "__main__":
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 37, 5000  # two row blocks, the second one partly masked
    logits = (torch.randn(rows, vocab, generator=gen) * 4).bfloat16()
    labels = torch.randint(vocab, (rows,), generator=gen)
    labels[0], labels[1] = 0, vocab - 1  # the first and the last logit of a row
    logits[2, 4500] = 30.0  # a row whose maximum sits in the masked block
    loss, grad = lm_loss._loss_and_grad_rows(logits, labels)
    ref_loss, ref_grad = lm_loss._loss_and_grad(logits, labels)
    # the interpreter truncates fp32 to bf16 where the GPU rounds to nearest: one bf16 step
    ulp = ref_grad.float().abs().clamp(min=2.0 ** -126) * 2.0 ** -7
    print(json.dumps({
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "grad_dtype": str(grad.dtype),
        "loss_max_rel": float(((loss - ref_loss).abs() / ref_loss.abs()).max()),
        "grad_within_one_bf16_step": bool(((grad.float() - ref_grad.float()).abs()
                                           <= ulp).all()),
        "grad_rows_sum_to_zero": float(grad.float().sum(dim=1).abs().max()),
    }))
