"""train/grad_accumulation.py: each bf16 gradient added into megatron's fp32 main gradient by a
Triton kernel under megatron's grad_added_to_main_grad protocol. Checked on the CPU through
Triton's interpreter against megatron's own add, in a real training step.

Run: pytest tests/train/test_grad_accumulation.py
"""

import json
import subprocess
import sys

from moe_lab.testing.distributed import child_env

from ..conftest import REPO, TINY_MOE


def test_hooks_accumulate_bit_for_bit_like_megatrons_add():
    env = child_env({"TRITON_INTERPRET": "1"})
    result = subprocess.run([sys.executable, "-m", "tests.train.interpreted_grad_accumulation",
                             TINY_MOE], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["interpreted"]
    assert got["hooked"] == got["params"] > 0  # every bf16 parameter with a main_grad
    # megatron's hook saw the flag and only dropped the bf16 gradient
    assert got["flags_after_backward"] == [[False], [True]]
    assert got["grads_dropped"]
    assert got["flags_after_zero_grad"] == [False]  # megatron resets it every step
    # two micro-batches accumulated: the same fp32 sums, then the same update
    assert got["grad_buffers_nonzero"]
    assert got["grad_buffers_equal"]
    assert got["weights_equal"]
