"""Run by tests/train/test_grad_norm.py in a child process with TRITON_INTERPRET=1:
train/grad_norm.py's kernel over fp32 and bf16 gradients of several sizes against the sum of
squares in float64; prints what the test compares as JSON."""

import json

import torch

from moe_lab.train.grad_norm import SquareSum


def main() -> None:
    torch.manual_seed(0)
    sizes = (3000, 1024, 17, 0)  # a partial last block, a whole block, under one block, empty
    grads = [torch.randn(n) for n in sizes] + [torch.randn(n).to(torch.bfloat16) for n in sizes]
    want = sum(float(g.double().square().sum()) for g in grads)
    square_sum = SquareSum(block=1024, num_warps=4)
    got = square_sum(grads)
    again = square_sum(grads)  # from the cached tables
    grads[0].mul_(2)  # same tensors, new values: the tables still hold
    doubled = square_sum(grads)
    want_doubled = want + 3 * float(grads[0].double().square().sum()) / 4
    print(json.dumps({"got": float(got), "want": want, "again": float(again),
                      "shape": list(got.shape), "dtype": str(got.dtype),
                      "tables": len(square_sum.tables),
                      "doubled": float(doubled), "want_doubled": want_doubled}))


if __name__ == "__main__":
    main()
