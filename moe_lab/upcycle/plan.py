"""The upcycling plan: the config's `upcycle` and `moe` sections resolved into numbers and
checked, before any weight is read.

Weight scaling (`upcycle.weight_scale: auto`) follows NVIDIA (arXiv 2410.07524) for the
granular layout (sparse is its G = 1 case): at step 0 top-k picks T/G copies of each of the G
shards, the shards of one copy sum to the dense FFN, and a SwiGLU expert's output scales by
about s**3 when gate, up and down are scaled by s. With softmax before top-k and no
renormalisation each selected expert weighs about 1/N, so the routed output is about
(T/G) * (1/N) * s**3 times the dense one: s = cbrt(N*G/T) = cbrt(E*G**2/T). When the k weights
sum to 1 (renormalised softmax, sigmoid routers), s = cbrt(G), as megatron-core does. qwen2's
experts are random channel subsets, for which no such rule exists: auto is 1 (Qwen2 does not
scale).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lab.config import ConfigError, ExperimentConfig
from moe_lab.routers import resolve_router
from moe_lab.upcycle.base import MoEShape, get_method
from moe_lab.upcycle.reinit import Reinit

DEFAULT_REINIT_FRACTION = {"qwen2": 0.5}  # the others: 0


@dataclass(frozen=True)
class UpcyclePlan:
    method: str
    shape: MoEShape
    moe_layers: tuple[int, ...]  # 0/1 per layer; dense layers keep the dense FFN
    hidden: int
    shared_ffn: int  # 0: no shared expert
    shared_gate: bool
    reinit: Reinit
    router_init: str
    granularity: int | None  # G for granular (and 1 for sparse); None for qwen2
    weight_scale: float
    weight_scale_rule: str
    shared_gate_init: str
    init_std: float
    seed: int


def make_plan(cfg: ExperimentConfig) -> UpcyclePlan:
    """Raises ConfigError naming the key when the settings do not fit together."""
    m, moe, up = cfg.model, cfg.moe, cfg.upcycle
    if not moe.enabled:
        raise ConfigError("moe.num_experts: upcycling builds a MoE model; set it (--num-experts) "
                          "to the number of routed experts", key="moe.num_experts")
    if up.method is None:
        raise ConfigError("upcycle.method: choose qwen2, granular or sparse (--method)",
                          key="upcycle.method")
    method = get_method(up.method)
    shape = MoEShape(m.ffn_hidden_size, moe.num_experts, moe.expert_ffn, moe.topk)
    method.check(shape)
    granularity = method.granularity(shape) if method.granularity else None
    router_init = up.router_init or method.default_router_init
    if router_init == "virtual-group":
        _check_virtual_group(up.method, granularity, moe.topk)
    scale, rule = _weight_scale(cfg, granularity)
    fraction = up.reinit_fraction
    if fraction is None:
        fraction = DEFAULT_REINIT_FRACTION.get(up.method, 0.0)
    return UpcyclePlan(
        method=up.method,
        shape=shape,
        moe_layers=tuple(moe.moe_layers(m.num_layers)),
        hidden=m.hidden_size,
        shared_ffn=moe.shared_expert_ffn,
        shared_gate=bool(moe.shared_expert_ffn) and moe.shared_expert_gate,
        # megatron-core's init_method and output_layer_init_method (no MuP, not hybrid).
        reinit=Reinit(fraction, up.reinit_granularity, in_std=m.init_std,
                      out_std=m.init_std / (2 * m.num_layers) ** 0.5),
        router_init=router_init,
        granularity=granularity,
        weight_scale=scale,
        weight_scale_rule=rule,
        shared_gate_init=up.shared_gate_init,
        init_std=m.init_std,
        seed=up.seed,
    )


def _check_virtual_group(method: str, granularity: int | None, topk: int) -> None:
    if granularity is None:
        raise ConfigError(f"upcycle.router_init: virtual-group needs experts that are copies of "
                          f"shards (granular or sparse), not {method}; use normal or zeros",
                          key="upcycle.router_init")
    if topk % granularity:
        raise ConfigError(f"moe.topk: the virtual-group router picks whole copies of the "
                          f"{granularity} shards, so top-k must be a multiple of G = "
                          f"{granularity}; got {topk}", key="moe.topk")


def softmax_before_topk(cfg: ExperimentConfig) -> bool:
    """True when the routing weights are a softmax over all experts, not renormalised over the
    k chosen ones (Qwen2-MoE's norm_topk_prob false)."""
    resolve_router(cfg.moe.router)  # validates the router's name and parameters
    router = cfg.moe.router
    return (router["name"] == "topk_softmax"
            and router.get("order", "softmax_topk") == "softmax_topk"
            and not router.get("norm_topk_prob", False))


def _weight_scale(cfg: ExperimentConfig, granularity: int | None) -> tuple[float, str]:
    setting = cfg.upcycle.weight_scale
    if setting != "auto":
        return float(setting), "upcycle.weight_scale"
    if granularity is None:
        return 1.0, "1 (qwen2's experts are random channel subsets; Qwen2 does not scale)"
    n, t, g = cfg.moe.num_experts, cfg.moe.topk, granularity
    if softmax_before_topk(cfg):
        return (n * g / t) ** (1 / 3), f"cbrt(N*G/T) = cbrt({n}*{g}/{t}) (softmax before top-k)"
    return g ** (1 / 3), f"cbrt(G) = cbrt({g}) (the top-k weights sum to 1)"
