"""Where a training step's time goes: a torch.profiler breakdown of a step function.

`profile_step` runs a few steps under torch.profiler with every module of the model opening a
`module:<path>` range (forward hooks, removed afterwards) and writes, per variant:
- the top CUDA kernels by total GPU time, each with the class its launching ops fall in;
- GPU time per class (expert GEMM, attention, optimizer, permutation/dispatch, communication,
  LM head + cross-entropy, ...), forward and backward together;
- per step: kernel time, GPU busy time (union of kernel intervals), host time spent blocked in
  CUDA synchronisation, and where (which module) those synchronisations happen;
- GPU idle time between kernels, charged to the kernel the GPU then waited for (its phase and
  class): where a host-bound step starves the GPU.

A kernel is classed by the CPU op that launched it: its op names, the module range it ran in
(backward ops inherit the module of the forward op with the same autograd sequence number) and
the step phase (`phase:*` ranges opened by the bench's step functions and moe_lab's Trainer).
On the CPU there are no kernels; the op's own CPU time stands in, so the plumbing is testable.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

CLASSES = [
    "expert GEMM (grouped_mm)",
    "experts elementwise (SwiGLU, probs)",
    "shared expert",
    "attention core (SDPA)",
    "attention projections, RoPE",
    "router",
    "permutation / dispatch",
    "communication (NCCL)",
    "LM head + cross-entropy",
    "embedding",
    "grad accumulation (main_grad)",
    "optimizer, grad clip, master copies",
    "norms, residuals, other",
    "not attributed",
]
# the update and what serves it: zeroing grad buffers, the non-finite guard's grad norm
_OPTIMIZER_PHASES = ("optimizer", "zero_grad", "guard")
_SYNC = re.compile(r"^cuda(StreamSynchronize|DeviceSynchronize|EventSynchronize|Memcpy|MemcpyAsync)$")
_COMM = re.compile(r"nccl|c10d|all_to_all|alltoall|all_reduce|allreduce|all_gather|allgather|"
                   r"reduce_scatter|record_param_comms", re.I)
_ATTN = re.compile(r"scaled_dot_product|flash_attention|efficient_attention|cudnn_attention", re.I)
_PERMUTE = re.compile(r"sort|index|scatter|gather|masked|nonzero|histc|bincount|cumsum|"
                      r"repeat_interleave|one_hot|where", re.I)


def module_role(path: str) -> str:
    """A module path (model.named_modules()) -> its role in a MoE transformer."""
    p = re.sub(r"\.\d+", "", path)
    if "output_layer" in p or "lm_head" in p:
        return "lm_head"
    if "embed" in p:
        return "embedding"
    if "shared_expert" in p:
        return "shared_expert"
    if p.endswith(".router") or ".router." in p or p.endswith(".mlp.gate"):
        return "router"
    if ".experts" in p:
        return "experts"
    if "attention" in p or "self_attn" in p:
        return "attention"
    if "norm" in p:
        return "norm"
    if p.endswith(".mlp"):
        return "moe_layer"
    if p in ("", "module", "model"):
        return "top"  # the LM loss and position ids run in the outermost model's forward
    return "other"


def classify(ops: list[str], role: str | None, phase: str | None) -> str:
    names = " ".join(ops)
    if phase in _OPTIMIZER_PHASES:
        return "optimizer, grad clip, master copies"
    if "AccumulateGrad" in names:
        return "grad accumulation (main_grad)"
    if _COMM.search(names):
        return "communication (NCCL)"
    if "grouped_mm" in names or "GroupedMm" in names:
        return "expert GEMM (grouped_mm)"
    if _ATTN.search(names):
        return "attention core (SDPA)"
    if role in ("lm_head", "top"):
        return "LM head + cross-entropy"
    if role in ("experts", "moe_layer") and _PERMUTE.search(names):
        return "permutation / dispatch"
    return {"moe_layer": "permutation / dispatch", "experts": "experts elementwise (SwiGLU, probs)",
            "router": "router", "shared_expert": "shared expert",
            "attention": "attention projections, RoPE", "embedding": "embedding"}.get(
                role, "norms, residuals, other")


@contextmanager
def module_ranges(model: torch.nn.Module):
    """Every module's forward inside a `module:<path>` profiler range (hooks removed on exit)."""
    handles, stack = [], []

    def enter(name):
        def hook(module, args):
            rf = record_function(f"module:{name}")
            rf.__enter__()
            stack.append(rf)
        return hook

    def leave(module, args, output):
        if stack:
            stack.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile_step(step, model, steps: int = 2) -> dict:
    """Run `steps` steps of an already warmed-up step function under the profiler."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with module_ranges(model), profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    return analyse(prof.events(), steps, cuda)


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def analyse(events, steps: int, cuda: bool) -> dict:
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    # (thread, autograd sequence number) of forward ops -> their module path
    fwd_module: dict = {}
    for e in cpu:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            path = _innermost(e, "module:")
            if path is not None:
                fwd_module.setdefault((e.thread, e.sequence_nr), path)
    unmapped = [0.0]

    def op_class(op):
        """(class, phase) of the kernels that CPU op launched."""
        chain = list(_ancestors(op))
        ops = [a.name for a in chain if not a.name.startswith(("module:", "phase:"))]
        phase = next((a.name[6:] for a in chain if a.name.startswith("phase:")), None)
        path = next((a.name[7:] for a in chain if a.name.startswith("module:")), None)
        backward = next((a for a in chain if a.name.startswith("autograd::engine::")), None)
        if backward is not None:
            phase = phase if phase in _OPTIMIZER_PHASES else "backward"
            mapped = fwd_module.get((backward.fwd_thread, backward.sequence_nr))
            if mapped is None:
                phase = f"{phase} (no forward module)" if phase == "backward" else phase
            path = mapped if mapped is not None else path
        elif phase not in _OPTIMIZER_PHASES:
            phase = "forward"
        return classify(ops, module_role(path) if path is not None else None, phase), phase

    sync_us: Counter = Counter()
    sync_count = 0
    for e in cpu:
        if _SYNC.match(e.name):
            sync_count += 1
            parent = e.cpu_parent
            where = module_role(_innermost(parent, "module:") or "") if parent else "top"
            phase = _innermost(parent, "phase:") if parent else None
            place = f"{phase}/{where}" if phase else "outside the step (final synchronize)"
            sync_us[place] += e.cpu_time_total

    # (name, microseconds, class, phase) of every kernel
    attributed = []
    if cuda:
        # A kernel and the CUDA runtime call that launched it share CUPTI's correlation id;
        # the runtime call sits inside the CPU op that issued it. (GPU-side copies of
        # record_function ranges, user annotations, are not kernels.)
        runtime = {e.id: e for e in cpu if e.name.startswith("cu") and e.id > 0}
        cache: dict = {}
        # fallback when the launch call has no parent op: the class most often seen for a
        # kernel of that name among the ops torch links kernels to
        by_name: dict = defaultdict(Counter)
        for e in cpu:
            if e.kernels and not e.is_user_annotation and not e.name.startswith(
                    ("module:", "phase:")):
                if id(e) not in cache:
                    cache[id(e)] = op_class(e)
                for k in e.kernels:
                    by_name[k.name][cache[id(e)]] += 1
        for k in events:
            if k.device_type == DeviceType.CPU or k.is_user_annotation:
                continue
            launch = runtime.get(k.id)
            op = launch.cpu_parent if launch is not None else None
            if op is None:
                guess = by_name.get(k.name)
                cls, phase = guess.most_common(1)[0][0] if guess else ("not attributed", "?")
                phase = f"{phase} (by kernel name)"
            else:
                if id(op) not in cache:
                    cache[id(op)] = op_class(op)
                cls, phase = cache[id(op)]
            attributed.append((k.name, k.time_range.elapsed_us(), cls, phase,
                               k.time_range.start, k.time_range.end))
    else:  # no kernels on the CPU: leaf ops' own CPU time stands in
        for e in cpu:
            if e.cpu_children or e.is_user_annotation or _SYNC.match(e.name) \
                    or e.name.startswith(("module:", "phase:")):
                continue
            cls, phase = op_class(e)
            attributed.append((e.name, e.self_cpu_time_total, cls, phase, 0.0, 0.0))

    class_us: Counter = Counter()
    phase_us: Counter = Counter()
    class_phase_us: Counter = Counter()
    by_kernel: dict = defaultdict(lambda: [0.0, 0, Counter()])
    for name, us, cls, phase, _, _ in attributed:
        class_us[cls] += us
        phase_us[phase] += us
        class_phase_us[(cls, phase)] += us
        entry = by_kernel[name]
        entry[0] += us
        entry[1] += 1
        entry[2][cls] += us
    total_us = sum(class_us.values())
    busy_us = _union([(s, e) for *_, s, e in attributed]) if cuda else float("nan")
    idle_us = idle_before([(s, e, f"{phase} / {cls}") for _, _, cls, phase, s, e in attributed])
    starts = [e.time_range.start for e in cpu] or [0.0]
    ends = [e.time_range.end for e in cpu] or [0.0]
    window_us = max(ends) - min(starts)
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    per = 1e3 * steps
    return {
        "steps": steps,
        "window_ms_per_step": window_us / per,
        "kernel_ms_per_step": total_us / per,
        "gpu_busy_ms_per_step": busy_us / per,
        "sync_wait_ms_per_step": sum(sync_us.values()) / per,
        "syncs_per_step": sync_count / steps,
        "sync_wait_ms_by_place": {k: v / per for k, v in sync_us.most_common()},
        "gpu_idle_ms_per_step": sum(idle_us.values()) / per,
        "gpu_idle_ms_before": {k: v / per for k, v in idle_us.most_common(12)},
        "class_ms_per_step": {c: class_us[c] / per for c in CLASSES if class_us[c]},
        "phase_ms_per_step": {p: v / per for p, v in phase_us.most_common()},
        "class_phase_ms_per_step": {f"{c} / {p}": v / per
                                    for (c, p), v in class_phase_us.most_common()},
        "top_kernels": [{"kernel": name[:120], "ms_per_step": v[0] / per,
                         "calls_per_step": v[1] / steps, "class": v[2].most_common(1)[0][0]}
                        for name, v in top],
    }


def _innermost(event, prefix: str):
    for a in _ancestors(event):
        if a.name.startswith(prefix):
            return a.name[len(prefix):]
    return None


def idle_before(kernels) -> Counter:
    """(start, end, label) of kernels -> GPU idle time between them, summed per label of the
    kernel that ended each idle gap (the work the GPU was waiting for)."""
    idle: Counter = Counter()
    end = None
    for start, stop, label in sorted(kernels):
        if end is not None and start > end:
            idle[label] += start - end
        end = stop if end is None else max(end, stop)
    return idle


def _union(intervals) -> float:
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def render(name: str, result: dict, timing=None) -> str:
    lines = [f"## {name}", ""]
    if timing is not None:
        lines.append(f"Unprofiled: {timing.steady_ms:.1f} ms/step back to back, isolated "
                     f"{timing.wall_ms:.1f} ms/step, host thread CPU {timing.host_ms:.1f} ms/step "
                     f"(includes spinning in syncs), kernel {timing.gpu_ms:.1f} ms/step.")
    r = result
    lines += [f"Profiled ({r['steps']} steps): window {r['window_ms_per_step']:.1f} ms/step, "
              f"kernels {r['kernel_ms_per_step']:.1f}, GPU busy {r['gpu_busy_ms_per_step']:.1f}, "
              f"host blocked in CUDA syncs {r['sync_wait_ms_per_step']:.1f} ms/step "
              f"({r['syncs_per_step']:.0f} syncs/step).", ""]
    lines += ["| class | GPU ms/step | share of kernel time |", "|---|---|---|"]
    total = r["kernel_ms_per_step"] or 1.0
    for c, ms in sorted(r["class_ms_per_step"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {c} | {ms:.2f} | {ms / total:.1%} |")
    lines += ["", "| phase | GPU ms/step |", "|---|---|"]
    lines += [f"| {p} | {ms:.2f} |" for p, ms in r["phase_ms_per_step"].items()]
    lines += ["", "| class / phase | GPU ms/step |", "|---|---|"]
    lines += [f"| {k} | {ms:.2f} |" for k, ms in r["class_phase_ms_per_step"].items()
              if ms >= 0.05 * (r["kernel_ms_per_step"] or 1) / 5]
    lines += ["", "| host blocked in sync (phase/module) | ms/step |", "|---|---|"]
    lines += [f"| {p} | {ms:.2f} |" for p, ms in r["sync_wait_ms_by_place"].items()]
    if r.get("gpu_idle_ms_before"):
        lines += ["", f"GPU idle between kernels: {r['gpu_idle_ms_per_step']:.2f} ms/step.", "",
                  "| GPU idle, waiting for (phase / class) | ms/step |", "|---|---|"]
        lines += [f"| {p} | {ms:.2f} |" for p, ms in r["gpu_idle_ms_before"].items()]
    lines += ["", "| top kernels | ms/step | calls/step | class |", "|---|---|---|---|"]
    lines += [f"| `{k['kernel'][:90]}` | {k['ms_per_step']:.2f} | {k['calls_per_step']:.0f} | "
              f"{k['class']} |" for k in r["top_kernels"]]
    return "\n".join(lines) + "\n"


def write(folder: str | Path, name: str, result: dict, timing=None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(render(name, result, timing))
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1))
