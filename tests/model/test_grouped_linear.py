"""experts/grouped.py GroupedLinear: the torch backend's expert projection gives autograd's
grouped_mm results, and under megatron's DDP adds its weight gradient into `main_grad` itself.

Run: pytest tests/model/test_grouped_linear.py
"""

import torch
import torch.nn.functional as F

from moe_lab.experts.grouped import GroupedLinear


def _inputs():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])  # an expert without tokens too
    x = torch.randn(int(counts.sum()), 8, generator=gen, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(4, 16, 8, generator=gen))
    return x, weight, torch.cumsum(counts, 0).to(torch.int32)


def test_forward_and_gradients_equal_autograd_grouped_mm():
    x, weight, offsets = _inputs()
    grad_out = torch.randn(x.shape[0], 16, generator=torch.Generator().manual_seed(1))
    y = GroupedLinear.apply(x, weight, offsets)
    y.backward(grad_out)
    got = y.detach(), x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    ref = F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    ref.backward(grad_out)
    torch.testing.assert_close(got[0], ref.detach())
    torch.testing.assert_close(got[1], x.grad)
    torch.testing.assert_close(got[2], weight.grad)
    assert got[2][1].abs().max() == 0  # the expert without tokens


def test_weight_gradient_goes_into_main_grad_under_megatron_ddp():
    """Megatron's DDP gives each parameter `main_grad` and `grad_added_to_main_grad`; its hook
    skips the add when the flag is set, as with its own fused-wgrad layers."""
    x, weight, offsets = _inputs()
    grad_out = torch.randn(x.shape[0], 16, generator=torch.Generator().manual_seed(1))
    F.grouped_mm(x, weight.transpose(1, 2), offs=offsets).backward(grad_out)
    expected = weight.grad.clone()
    weight.grad = None
    weight.main_grad = torch.zeros_like(weight)
    weight.grad_added_to_main_grad = False
    for _ in range(2):  # two micro-batches accumulate
        GroupedLinear.apply(x, weight, offsets).backward(grad_out)
    torch.testing.assert_close(weight.main_grad, 2 * expected)
    assert weight.grad_added_to_main_grad
    assert weight.grad.shape == weight.shape  # the dummy DDP's hook sees (and discards)
