"""`moe-lab bench` end to end on the CPU with the tiny model: every variant builds, trains and
lands in the table and the JSON. (Speed itself is measured on the GPU machine.)

Run: pytest tests/bench
"""

import json

from moe_lab.bench.profile import idle_before
from moe_lab.testing import run_cli

from ..conftest import TINY_MOE


# the last two with an override of their own (megatron's unfused loss instead of the default;
# DDP's overlapped reduction, the one parallel.* key a variant may set)
NAMES = ["hf_grouped_fp32", "mcore_local_fp32", "mcore_torch_fp32",
         "mcore_torch_fp32+training.cross_entropy=megatron",
         "mcore_torch_fp32+parallel.overlap_grad_reduce=true"]


def test_bench_times_transformers_and_moe_lab_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(["bench", "--preset", TINY_MOE, "--layers", "2", "--seq", "32", "--mbs", "2",
                      "--variants", ",".join(NAMES), "--warmup", "1", "--steps", "2",
                      "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("| variant |")[1]
    for name in NAMES:
        assert f"| {name} |" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == NAMES
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in rows)


def test_unknown_variant_is_one_line():
    result = run_cli(["bench", "--variants", "mcore_fast_bf16"])
    assert result.returncode == 2
    assert result.stderr.strip() == "moe-lab: error: --variants: unknown variant 'mcore_fast_bf16'"
    result = run_cli(["bench", "--variants", "mcore_torch_bf16+training.cross_entropy=fast"])
    assert result.returncode == 2
    assert "training.cross_entropy" in result.stderr and len(result.stderr.splitlines()) == 1
    # a variant of its own layout would need other process groups: refused before any build
    result = run_cli(["bench", "--preset", TINY_MOE, "--variants",
                      "mcore_torch_fp32,mcore_torch_fp32+parallel.sequence_parallel=false"])
    assert result.returncode == 2
    assert "one parallel layout" in result.stderr and len(result.stderr.splitlines()) == 1


def test_profile_writes_kernel_classes_per_variant(tmp_path):
    """--profile: per variant a markdown table and JSON of time per class (on the CPU the ops'
    own CPU time stands in for kernels), with the step's phases and top kernels."""
    folder = tmp_path / "profile"
    result = run_cli(["bench", "--preset", TINY_MOE, "--layers", "2", "--seq", "32", "--mbs", "2",
                      "--variants", "hf_grouped_fp32,mcore_torch_fp32", "--warmup", "1",
                      "--steps", "1", "--profile", str(folder)])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("hf_grouped_fp32", "mcore_torch_fp32"):
        data = json.loads((folder / f"{name}.json").read_text())
        classes = data["class_ms_per_step"]
        for cls in ("expert GEMM (grouped_mm)", "optimizer, grad clip, master copies",
                    "LM head + cross-entropy", "attention core (SDPA)", "router"):
            assert classes.get(cls, 0) > 0, (name, cls, classes)
        assert {"forward", "backward", "optimizer"} <= set(data["phase_ms_per_step"])
        assert data["top_kernels"]
        assert "| class | GPU ms/step |" in (folder / f"{name}.md").read_text()
    assert "grad accumulation (main_grad)" in json.loads(
        (folder / "mcore_torch_fp32.json").read_text())["class_ms_per_step"]


def test_a_variant_runs_in_a_child_process(tmp_path, capsys):
    """On one GPU each variant runs in a fresh `moe-lab bench --in-process` child (megatron's
    C++ gradient hooks keep a finished model's memory); here the child path on the CPU."""
    from moe_lab.launch.commands.bench import _child_rows
    from moe_lab.launch.cli import build_parser

    args = build_parser().parse_args(["bench", "--preset", TINY_MOE, "--layers", "2", "--seq",
                                      "32", "--mbs", "2", "--warmup", "1", "--steps", "1",
                                      "training.cross_entropy=megatron"])
    rows = _child_rows(args, "mcore_torch_fp32")
    assert [r.name for r in rows] == ["mcore_torch_fp32"]
    assert rows[0].error is None and rows[0].tokens_per_s > 0 and rows[0].timing.wall_ms > 0
    assert rows[0].timing.steady_ms > 0  # the back-to-back steps the tokens/s come from
    printed = capsys.readouterr().out
    assert "mcore_torch_fp32: " in printed and "| variant |" not in printed
    rows = _child_rows(args, "mcore_torch_fp32+moe.topk=99")
    assert rows[0].error and rows[0].tokens_per_s == 0


def test_gpu_idle_is_charged_to_the_kernel_it_waited_for():
    """Idle gaps between kernel intervals (overlapping streams merged) go to the next kernel."""
    kernels = [(0, 10, "fwd / a"), (5, 12, "fwd / b"),  # overlap: no gap
               (20, 25, "opt / c"),                      # 8 idle before c
               (24, 30, "opt / c"), (31, 40, "fwd / a")]  # 1 idle before the second a
    assert idle_before(kernels) == {"opt / c": 8, "fwd / a": 1}
    assert idle_before([]) == {}
