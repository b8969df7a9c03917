"""MLflow params of a run: the resolved config flattened to dotted keys, plus derived sizes.

The `tracking` section is left out (it says where a run is logged, not what was trained); values
are JSON (`true`, `null`, `[0.9, 0.95]`) except strings, which stay as they are.
"""

from __future__ import annotations

import dataclasses
import json

from moe_lab.config import ExperimentConfig, derive

_NOT_PARAMS = ("tracking",)


def flatten(mapping: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value if isinstance(value, str) else json.dumps(value)
    return flat


def run_params(cfg: ExperimentConfig) -> dict[str, str]:
    sections = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_PARAMS}
    derived = derive(cfg)
    sections["derived"] = {"total_params": derived.total_params,
                           "active_params": derived.active_params,
                           "flops_per_token": derived.flops_per_token,
                           "moe_layers": derived.moe_layers}
    return flatten(sections)
