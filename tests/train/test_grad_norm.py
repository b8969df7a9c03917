"""train/grad_norm.py: the gradients' sum of squares in one Triton launch, through Triton's
interpreter on the CPU (the GPU runs it in every fused step: tests/gpu)."""

import json
import subprocess
import sys

from moe_lab.testing.distributed import child_env

from ..conftest import REPO


def test_square_sum_of_fp32_and_bf16_gradients_matches_float64():
    result = subprocess.run([sys.executable, "-m", "tests.train.interpreted_grad_norm"],
                            cwd=REPO, env=child_env({"TRITON_INTERPRET": "1"}),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["shape"] == [1] and got["dtype"] == "torch.float32"
    assert abs(got["got"] - got["want"]) < 1e-5 * got["want"]
    assert got["again"] == got["got"] and got["tables"] == 2  # one launch per dtype
    assert abs(got["doubled"] - got["want_doubled"]) < 1e-5 * got["want_doubled"]
