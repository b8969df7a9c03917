"""Write an upcycled MoE checkpoint: OUT/checkpoints/step_0000000 (+ `latest`), OUT/upcycled.yaml
and OUT/upcycle_report.json.

The MoE GPTModel is built once, uninitialised (TP = PP = EP = 1, fp32); each part of the upcycled
state (state_dict.py) is copied into it and the dense layer it came from is dropped before the
next, so the peak is about the dense model plus the MoE model plus one layer's new tensors. The
checkpoint is saved by moe_lab.train.checkpoint.save_checkpoint, so `moe-lab train` loads it with
`checkpoint.init_from=OUT` in any parallel layout. The report is written last: a directory
without it is incomplete.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import resource
from pathlib import Path

import torch

from moe_lab import config as config_lib
from moe_lab.config import ConfigError, ExperimentConfig, UpcycleConfig
from moe_lab.train.checkpoint import TrainState, save_checkpoint
from moe_lab.upcycle import rng
from moe_lab.upcycle.plan import UpcyclePlan, make_plan, softmax_before_topk
from moe_lab.upcycle.source import DenseSource
from moe_lab.upcycle.state_dict import upcycle_parts
from moe_lab.upcycle.template import build_uninitialised, tensors_of

REPORT = "upcycle_report.json"
_NUMBER_LIST = re.compile(r"\[\s*((?:-?[\d.e+-]+,?\s*)+)\]")
CONFIG = "upcycled.yaml"


class _NoSchedule:
    """save_checkpoint stores the LR scheduler's state; a fresh MoE has none."""

    def state_dict(self) -> dict:
        return {}


def settings_of(cfg: ExperimentConfig) -> dict:
    """What the upcycled weights depend on (a finished OUT with other settings is stale)."""
    raw = config_lib.to_dict(cfg)
    return {section: raw[section] for section in ("model", "moe", "upcycle")}


def read_report(out: Path) -> dict | None:
    path = Path(out) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


@dataclasses.dataclass
class _Filled:
    written: set
    reports: list


def write_upcycled(cfg: ExperimentConfig, source: DenseSource, out: Path) -> dict:
    """Needs a world of one (torch.distributed + megatron parallel state). Returns the report."""
    out = Path(out)
    plan = make_plan(cfg)
    rss_before = _max_rss_bytes()
    dense = source.read()
    gc.collect()  # the dense GPTModel's module cycles: its tensors now live only in `dense`
    dense_bytes = _nbytes(dense)
    model = build_uninitialised(cfg)
    targets = tensors_of(model)
    layers = _fill(targets, dense, plan)
    unset = sorted({name for name, _ in model.named_parameters()} - layers.written)
    assert not unset, f"upcycling left parameters unset: {unset[:3]}"
    checkpoint = save_checkpoint(out, TrainState(), model, None, _NoSchedule())
    report = _report(cfg, plan, source, out, checkpoint, layers.reports)
    report["memory"] = {"peak_rss_bytes": _max_rss_bytes(), "rss_before_reading_bytes": rss_before,
                        "dense_bytes": dense_bytes, "moe_bytes": _nbytes(targets)}
    _write_config(cfg, out)
    _write_json(out / REPORT, report)
    return report


def _fill(targets: dict, dense: dict, plan: UpcyclePlan) -> _Filled:
    filled = _Filled(set(), [])
    for part in upcycle_parts(dense, plan):
        for key, tensor in part.tensors.items():
            target = targets.get(key)
            if target is None or target.shape != tensor.shape:
                raise ConfigError(
                    f"upcycle.source: upcycled tensor {key} {tuple(tensor.shape)} does not match "
                    f"the MoE model's {None if target is None else tuple(target.shape)}",
                    key="upcycle.source")
            with torch.no_grad():
                target.copy_(tensor)
            filled.written.add(key)
        if part.report is not None:
            filled.reports.append(part.report)
        for key in part.consumed:
            del dense[key]  # this dense layer is done: free it before building the next
        del part
    return filled


def _report(cfg, plan: UpcyclePlan, source: DenseSource, out: Path, checkpoint: Path,
            layers: list[dict]) -> dict:
    fractions = [e["reinit_fraction"] for layer in layers for e in layer["experts"]]
    return {
        "method": plan.method,
        "source": str(source.path.resolve()),
        "dense_checkpoint": str(source.checkpoint.resolve()) if source.checkpoint else None,
        "checkpoint": str(checkpoint.resolve()),
        "seed": plan.seed,
        "stream_seed_derivation": rng.DERIVATION,
        "dense_ffn": plan.shape.dense_ffn,
        "num_experts": plan.shape.num_experts,
        "expert_ffn": plan.shape.expert_ffn,
        "topk": plan.shape.topk,
        "shared_expert_ffn": plan.shared_ffn,
        "granularity": plan.granularity,
        "expansion_rate": (plan.shape.num_experts // plan.granularity
                           if plan.granularity else None),
        "router_init": plan.router_init,
        "softmax_before_topk": softmax_before_topk(cfg),
        "weight_scale": plan.weight_scale,
        "weight_scale_rule": plan.weight_scale_rule,
        "reinit": dataclasses.asdict(plan.reinit),
        "reinit_fraction_mean": sum(fractions) / len(fractions) if fractions else 0.0,
        "shared_gate_init": plan.shared_gate_init if plan.shared_gate else None,
        "moe_layers": [i for i, is_moe in enumerate(plan.moe_layers) if is_moe],
        "settings": settings_of(cfg),
        "layers": layers,
    }


def _write_config(cfg: ExperimentConfig, out: Path) -> None:
    """An experiment config that trains from the upcycled weights: `moe-lab train
    OUT/upcycled.yaml --run-dir ...`."""
    ready = dataclasses.replace(
        cfg, upcycle=UpcycleConfig(),
        checkpoint=dataclasses.replace(cfg.checkpoint, init_from=str(out.resolve())))
    (out / CONFIG).write_text(config_lib.dump(ready))


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1)
    # One line per list of numbers (channel lists are long), one line per key otherwise.
    text = _NUMBER_LIST.sub(
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
