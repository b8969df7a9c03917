"""Dense state dict -> MoE state dict, one part at a time (pure: the input is never modified).

Keys are GPTModel.state_dict() names. Each MoE layer's `mlp.linear_fc1.weight` ([gate; up]) and
`mlp.linear_fc2.weight` become that layer's routed experts, router, shared expert and gate
(layer.py); every other tensor (embeddings, attention, norms, the dense layers of a model with
mixed dense and MoE layers, the output layer) is passed through unchanged. Parts come layer by
layer, so a caller can write each part into the model and drop the dense layer before the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

from moe_lab.config import ConfigError
from moe_lab.upcycle.layer import upcycle_mlp
from moe_lab.upcycle.plan import UpcyclePlan
from moe_lab.upcycle.swiglu import SwiGLU

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_FFN = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


@dataclass
class Part:
    tensors: dict[str, torch.Tensor]  # MoE state-dict entries
    consumed: list[str]  # the dense keys this part was made from
    report: dict | None = None  # the layer's report, for MoE layers
    layer: int | None = None


@dataclass
class _Layers:
    per_layer: dict[int, list[str]] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)


def upcycle_parts(dense: Mapping[str, torch.Tensor], plan: UpcyclePlan) -> Iterator[Part]:
    groups = _group(dense)
    missing = sorted(set(range(len(plan.moe_layers))) - set(groups.per_layer))
    if missing or len(groups.per_layer) != len(plan.moe_layers):
        raise ConfigError(f"upcycle.source: the dense state has layers "
                          f"{sorted(groups.per_layer)}, the config {len(plan.moe_layers)}",
                          key="upcycle.source")
    yield Part({k: dense[k] for k in groups.other}, list(groups.other))
    for layer, is_moe in enumerate(plan.moe_layers):
        keys = groups.per_layer[layer]
        # No local names for a part's tensors: the generator must not keep the previous layer
        # alive while the next one is built.
        if is_moe:
            yield _moe_layer(dense, layer, keys, plan)
        else:
            yield Part({k: dense[k] for k in keys}, keys, layer=layer)


def _moe_layer(dense: Mapping[str, torch.Tensor], layer: int, keys: list[str],
               plan: UpcyclePlan) -> Part:
    prefix = f"decoder.layers.{layer}."
    ffn_keys = [prefix + name for name in _FFN]
    _check_ffn(dense, prefix, keys, ffn_keys, plan)
    mlp = upcycle_mlp(SwiGLU.from_megatron(*(dense[k] for k in ffn_keys)), plan, layer)
    tensors = {k: dense[k] for k in keys if k not in ffn_keys}
    tensors.update({f"{prefix}mlp.{name}": t for name, t in mlp.tensors.items()})
    return Part(tensors, keys, mlp.report, layer)


def upcycle_state_dict(dense: Mapping[str, torch.Tensor],
                       plan: UpcyclePlan) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The whole MoE state dict and the per-layer reports (for small models and tests)."""
    state, reports = {}, []
    for part in upcycle_parts(dense, plan):
        state.update(part.tensors)
        if part.report is not None:
            reports.append(part.report)
    return state, reports


def _group(dense: Mapping[str, torch.Tensor]) -> _Layers:
    groups = _Layers()
    for key in dense:
        match = _LAYER.match(key)
        if match:
            groups.per_layer.setdefault(int(match.group(1)), []).append(key)
        else:
            groups.other.append(key)
    return groups


def _check_ffn(dense, prefix: str, keys: list[str], ffn_keys: list[str],
               plan: UpcyclePlan) -> None:
    extra = [k for k in keys if k.startswith(prefix + "mlp.") and k not in ffn_keys]
    if extra:
        raise ConfigError(f"upcycle.source: dense tensor {extra[0]} is not part of a bias-free "
                          f"SwiGLU FFN, which is all upcycling knows", key="upcycle.source")
    ffn, hidden = plan.shape.dense_ffn, plan.hidden
    expected = {ffn_keys[0]: (2 * ffn, hidden), ffn_keys[1]: (hidden, ffn)}
    for key, shape in expected.items():
        if key not in dense:
            raise ConfigError(f"upcycle.source: dense tensor {key} is missing",
                              key="upcycle.source")
        if tuple(dense[key].shape) != shape:
            raise ConfigError(f"upcycle.source: dense tensor {key} has shape "
                              f"{tuple(dense[key].shape)}, expected {shape} for "
                              f"model.ffn_hidden_size {ffn}", key="upcycle.source")
