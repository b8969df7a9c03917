"""train/master_adamw.py: the fp32-master AdamW update as one Triton kernel writing the bf16
weights too. The kernel's arithmetic and addressing are checked on the CPU through Triton's
interpreter against megatron's update; where it may be used is checked in this process.
tests/gpu/test_master_adamw.py compares whole training runs on the GPU.

Run: pytest tests/train/test_master_adamw.py
"""

import json
import subprocess
import sys

import pytest

from moe_lab import config as C
from moe_lab.testing.distributed import child_env, free_port
from moe_lab.train import master_adamw
from moe_lab.train.loop import build_training

from ..conftest import REPO, TINY_MOE


@pytest.mark.parametrize("ranks, distributed, optimizer", [
    (1, "true", "DistributedOptimizer"), (1, "false", "Float16OptimizerWithFloat16Params"),
    (2, "true", "DistributedOptimizer")])  # data parallel: each rank updates its shard
def test_kernel_updates_like_torch_adamw_and_writes_the_bf16_weights(ranks, distributed,
                                                                     optimizer):
    env = child_env({"TRITON_INTERPRET": "1"})
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                     "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    result = subprocess.run([*launcher, "-m", "tests.train.interpreted_master_adamw", TINY_MOE,
                             f"optimizer.distributed={distributed}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["interpreted"] and got["world"] == ranks
    assert got["optimizers"] == [optimizer]
    assert got["weights_same_on_every_rank"]  # megatron's all-gather ran after the kernel
    assert got["grad_norm_step1"][0] > 0.3  # clip_grad=0.3: the kernel's grad_scale acts
    assert got["grad_norm_step1"][1] == got["grad_norm_step1"][0]
    # torch's fused AdamW and the kernel: same formula, fp32 rounding apart
    assert got["masters_max_rel"] < 1e-6
    assert got["moments_max_rel"] < 1e-6
    # every bf16 weight of the model is written, from the updated master weight
    assert got["copies"][0] == got["copies"][1] > 0
    assert got["copies_exact"] == [True, True]
    assert got["launches_reused"]  # the address tables are built once
    # a NaN gradient: skipped on the GPU's flag, nothing written, the step count taken back
    assert got["skipped_second_step"] and got["steps_after_skip"] == [1.0]
    assert got["steps"] == [2.0] and got["step_devices"] == ["cpu"]


def test_kernel_steps_bf16_gradients_and_moments_like_torch_adamw_in_fp32():
    """The precision-aware optimizer's layout (fp32 master weights, bf16 gradients and moments):
    read in bf16, computed in fp32, stored back in bf16; and with the master weights as bf16
    weights + remainders. The GPU test compares it with TE's
    FusedAdam in training (tests/gpu/test_precision_aware.py)."""
    result = subprocess.run([sys.executable, "-m", "tests.train.interpreted_adamw_dtypes"],
                            cwd=REPO, env=child_env({"TRITON_INTERPRET": "1"}),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["bf16_roles"] == [True, True, True]
    assert got["skipped"]  # the skip flag: nothing written
    assert got["master_max_rel"] < 1e-6
    assert got["moments_changed"]
    # bf16 keeps 8 significant bits (the interpreter truncates where the GPU rounds)
    assert got["exp_avg_rel"] < 2 ** -7 and got["exp_avg_sq_rel"] < 2 ** -7
    assert got["copy_ulps"] <= 1
    # store_param_remainders: the fp32 master weight joined from the bf16 weight and its int16
    # remainder, updated, split again; every number as in the fp32 master weights' launch
    assert got["remainders"] == {"launch": [True, True], "skipped": True, "master_equal": True,
                                 "split_equal": True, "moments_equal": True}


def test_cpu_training_keeps_megatrons_update_and_triton_is_refused(world):
    cfg = C.load(TINY_MOE, ["tracking.enabled=false", "training.precision=bf16"])
    _, _, optimizer, _ = build_training(cfg, use_gpu=False)
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    assert "not on CUDA" in master_adamw.unsupported_reason(subs[0])
    assert not any(hasattr(sub, "moe_lab_master_adamw") for sub in subs)  # auto: megatron's
    cfg = C.load(TINY_MOE, ["tracking.enabled=false", "training.precision=bf16",
                            "optimizer.update_impl=triton"])
    with pytest.raises(ValueError, match="optimizer.update_impl=triton: not possible here"):
        build_training(cfg, use_gpu=False)


def test_update_impl_is_checked_with_the_config():
    with pytest.raises(ValueError, match="optimizer.update_impl"):
        C.load(TINY_MOE, ["optimizer.update_impl=fast"])
    # the precision-aware optimizer's bf16 state is the kernel's too, remainders included
    C.load(TINY_MOE, ["optimizer.update_impl=triton", "optimizer.precision_aware=true",
                      "optimizer.exp_avg_dtype=bf16", "training.precision=bf16"])
    C.load(TINY_MOE, ["optimizer.update_impl=triton", "optimizer.precision_aware=true",
                      "optimizer.store_param_remainders=true", "training.precision=bf16"])
