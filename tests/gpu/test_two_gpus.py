"""Two GPUs under NCCL: EP=2, TP=2 (sequence parallel), PP=2 and DP=2 continue one checkpoint
like one GPU does, and EP=2 scales the Qwen1.5-MoE-A2.7B shape.

Keep NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 set.
Run: pytest tests/gpu/test_two_gpus.py -s
"""

import math
import statistics

import pytest

from moe_lab.testing import run_cli, run_distributed
from moe_lab.tracking import read_metrics

from .conftest import needs_gpus, report

# A mid-sized Qwen2-MoE (16 experts x 512, top-4, shared expert), bf16, torch backend.
SMALL = ["model.num_layers=4", "model.hidden_size=1024", "model.num_attention_heads=16",
         "model.num_query_groups=4", "model.ffn_hidden_size=2816", "moe.num_experts=16",
         "moe.topk=4", "moe.expert_ffn=512", "moe.shared_expert_ffn=1024",
         "model.vocab_size=32000", "training.seq_length=1024", "training.micro_batch_size=2",
         "training.global_batch_size=8", "training.precision=bf16", "model.backend=torch",
         "optimizer.lr=3e-4", "optimizer.warmup_steps=0", "training.log_interval=1"]
LAYOUTS = {"ep2_alltoall": ["parallel.ep=2", "moe.dispatcher=alltoall"],
           "tp2_sp": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": []}
# bf16 forward and backward in another reduction order: curves drift apart slowly.
LOSS_RTOL = 2e-2


def _train(nproc, run_dir, extra):
    args = ["train", "qwen1.5-moe-a2.7b", "--run-dir", str(run_dir), "tracking.enabled=false",
            *extra]
    result = run_cli(args, timeout=600) if nproc == 1 else run_distributed(nproc, args)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def checkpoint_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_gpus")
    _train(1, root / "base", [*SMALL, "training.max_steps=5"])
    cont = [*SMALL, f"checkpoint.init_from={root / 'base'}", "training.max_steps=20",
            "optimizer.warmup_steps=5", "checkpoint.enabled=false"]
    return root, cont, _train(1, root / "one_gpu", cont)


@needs_gpus(2)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_gpu_layout_follows_one_gpu(layout, checkpoint_and_reference):
    root, cont, reference = checkpoint_and_reference
    rows = _train(2, root / layout, [*cont, *LAYOUTS[layout]])
    diffs = [abs(r["loss"] - ref["loss"]) / ref["loss"] for r, ref in zip(rows, reference)]
    report(f"layout_{layout}", {"steps": len(rows), "max_rel_loss_diff": max(diffs),
                                "loss_1gpu": [ref["loss"] for ref in reference],
                                "loss_2gpu": [r["loss"] for r in rows]})
    assert len(rows) == 20 and all(math.isfinite(r["loss"]) for r in rows)
    assert max(diffs) < LOSS_RTOL


@needs_gpus(2)
def test_expert_parallel_weak_scaling_on_qwen15_shape(tmp_path):
    shape = ["model.num_layers=4", "training.seq_length=4096", "training.micro_batch_size=1",
             "training.max_steps=12", "training.log_interval=1", "checkpoint.enabled=false",
             "model.backend=torch", "training.precision=bf16", "optimizer.warmup_steps=0"]
    one = _train(1, tmp_path / "one", [*shape, "training.global_batch_size=2"])
    two = _train(2, tmp_path / "two", [*shape, "training.global_batch_size=4", "parallel.ep=2"])
    speed = [statistics.median(r["throughput/tokens_per_s"] for r in rows[4:])
             for rows in (one, two)]
    report("weak_scaling_ep2", {"tokens_per_s_1gpu": speed[0], "tokens_per_s_2gpu": speed[1],
                                "ratio": speed[1] / speed[0],
                                "mfu_1gpu": statistics.median(r["throughput/mfu"] for r in one[4:]),
                                "mfu_2gpu": statistics.median(r["throughput/mfu"] for r in two[4:])})
    # 2026-12-01: 1.72x (65.4k -> 112.8k tokens/s). 1.8x was set at 2.22x (41.7k -> 92.7k), when
    # the one-GPU optimizer step was slow; one GPU has since gained 57% from single-rank work
    # (no gradient reduction, the norm from the hooks' squares), EP=2 22%. What EP=2 pays and one
    # GPU does not: megatron's alltoall dispatcher waits on the host in every MoE layer (~11 ms
    # a step of GPU idle in the forward) and DP=2's unoverlapped reduce-scatter and all-gather
    # (~11 ms; docs/performance.md, eleventh session).
    assert speed[1] / speed[0] >= 1.6
