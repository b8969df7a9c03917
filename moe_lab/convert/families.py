"""Model families: one file each (qwen2.py, qwen2_moe.py), registered by HF architecture name.

A family is pure mappings, no I/O: HF config -> experiment config sections, experiment config ->
HF config.json fields, and the complete list of `TensorMap`s for a given experiment config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from moe_lab.config import ExperimentConfig
from moe_lab.convert.errors import ConversionError
from moe_lab.convert.tensors import TensorMap


@dataclass(frozen=True)
class Family:
    architecture: str  # HF `architectures[0]`, e.g. Qwen2MoeForCausalLM
    model_type: str  # HF `model_type`, e.g. qwen2_moe
    # HF config object (transformers' config class) -> {"model": {...}, "moe": {...}}
    sections_from_hf: Callable[[Any], dict]
    # experiment config -> the config.json fields this family owns (raises if not expressible)
    hf_config: Callable[[ExperimentConfig], dict]
    tensor_maps: Callable[[ExperimentConfig], list[TensorMap]]
    handles: Callable[[ExperimentConfig], bool]  # is this the family to export cfg as?
    # config.json keys moe-lab does not model, carried over from a template config.json
    carried_keys: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.architecture] = family
    return family


def family_for_architecture(architecture: str | None) -> Family:
    _load_families()
    if architecture not in _FAMILIES:
        raise ConversionError(f"architectures: unknown architecture {architecture!r} "
                              f"(supported: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[architecture]


def family_for_experiment(cfg: ExperimentConfig) -> Family:
    _load_families()
    for family in _FAMILIES.values():
        if family.handles(cfg):
            return family
    raise ConversionError("no Hugging Face family can express this model")


def _load_families() -> None:
    from moe_lab.convert import qwen2, qwen2_moe  # noqa: F401  (they register themselves)
