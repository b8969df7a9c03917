"""Optimizer state in parameter space: checkpoints that any parallel layout can load.

megatron-core 0.19.2's own optimizer checkpoints tie the state to the layout that wrote it: the
ChainedOptimizer prefixes its tensors `chained_0.`/`chained_1.` only when EP > 1 (dense and expert
parameters then have separate DistributedOptimizers), and its common state is a list of
param_groups in construction order. Here every parameter's state is saved as full-shape tensors
`optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>` that share the sharding metadata of the
model tensor they belong to, in one flat dict keyed by that name, plus a single number (Adam's
step). A layout that builds the same model asks for the same keys, so TP, PP, EP and DP can all
change between save and load.

The tensors come from megatron's APIs: a DistributedOptimizer's `fully_reshardable` parameter
state (gathered over its data-parallel group and unflattened to parameter shapes), and
`make_sharded_optimizer_tensor` for the plain (non-distributed) optimizers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from moe_lab.train.master_remainders import keeps_remainders

FORMAT = "param_space"
_PREFIX = "optimizer.state"
# Gather a DistributedOptimizer's state on data-parallel rank 0 only (over gloo) when saving,
# rather than on every DP rank: the full state of a model-parallel shard lives on one rank.
_SAVE_METADATA = {"distrib_optim_fully_reshardable_mem_efficient": True}


class OptimizerState:
    """Builds the sharded optimizer state for save or load and applies a loaded one.

    The same object must build the load template and apply the result: the template's
    tensors are where each sub-optimizer's state is loaded to.
    """

    def __init__(self, optimizer):
        self.subs = list(getattr(optimizer, "chained_optimizers", [optimizer]))
        self._templates: list[dict] = []

    def sharded_state(self, model_sharded: dict, is_loading: bool) -> dict:
        if is_loading:
            for sub in self.subs:
                _materialise(sub)
        self._templates = [_param_state(sub, model_sharded, is_loading) for sub in self.subs]
        # Where a tensor sits in this dict is local to the rank (dist_checkpointing stores it by
        # its key and offsets); only the number outside it goes to the common state.
        tensors = {str(i): template for i, template in enumerate(self._templates) if template}
        return {"tensors": tensors, "adam_step": 0 if is_loading else self._adam_step()}

    def load(self, loaded: dict) -> None:
        step = int(loaded["adam_step"])
        for i, sub in enumerate(self.subs):
            state = loaded["tensors"].get(str(i), {})
            if isinstance(sub, DistributedOptimizer):
                sub.load_parameter_state_from_fully_reshardable(state)
            else:
                _copy_plain_state(sub, state)
            _set_adam_step(sub, step)

    def _adam_step(self) -> int:
        """Adam's step count (every parameter steps together); the max over ranks, so that
        a rank whose optimizer shard is empty agrees with the others."""
        step = max((_step_of(sub) for sub in self.subs), default=0)
        # NCCL reduces CUDA tensors only; gloo (the CPU path) CPU tensors.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        count = torch.tensor([step], dtype=torch.long, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())


def _param_state(sub, model_sharded: dict, is_loading: bool) -> dict:
    """{param index: {state key: ShardedTensor}} for one sub-optimizer (empty where this rank
    saves nothing)."""
    if isinstance(sub, DistributedOptimizer):
        metadata = {} if is_loading else _SAVE_METADATA
        return sub.sharded_param_state_fully_reshardable(model_sharded, is_loading, metadata) or {}
    pairs = _model_and_main_params(sub)
    sharded = get_param_id_to_sharded_param_map(model_sharded, (m for m, _ in pairs))
    state = {}
    for idx, (_, main) in enumerate(pairs):
        if idx not in sharded:
            continue
        tensors = {"param": main, **{k: v for k, v in sub.optimizer.state.get(main, {}).items()
                                     if k != "step" and isinstance(v, torch.Tensor)}}
        state[idx] = {k: make_sharded_optimizer_tensor(sharded[idx], t, f"{_PREFIX}.{k}")
                      for k, t in tensors.items()}
    return state


def _model_and_main_params(sub) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model parameter, the fp32 parameter the optimizer updates) for a plain optimizer."""
    if hasattr(sub, "float16_groups"):  # bf16 model params with fp32 main copies
        pairs = [pair for model, main in zip(sub.float16_groups, sub.fp32_from_float16_groups)
                 for pair in zip(model, main)]
        return pairs + [(p, p) for group in sub.fp32_from_fp32_groups for p in group]
    return [(p, p) for group in sub.optimizer.param_groups for p in group["params"]]


def _copy_plain_state(sub, state: dict) -> None:
    pairs = _model_and_main_params(sub)
    with torch.no_grad():
        for idx, tensors in state.items():
            model, main = pairs[idx]
            main.copy_(tensors["param"].view_as(main))
            if model is not main:
                model.copy_(main)
            for key, value in tensors.items():
                if key != "param":
                    sub.optimizer.state[main][key].copy_(value.view_as(main))


def _materialise(sub) -> None:
    """A fresh optimizer has no per-parameter state until its first step; the loaders copy into
    existing exp_avg/exp_avg_sq. megatron's init hook creates them without touching the
    parameters."""
    inner = sub.optimizer
    if getattr(sub.config, "use_precision_aware_optimizer", False):
        # megatron-core 0.19.2's hook calls TE FusedAdam's initialize_state(param), but TE 2.x
        # requires a second argument, store_param_remainders (seen with TE 2.20.2: TypeError
        # on every resume). TE's own step passes its attribute for bf16 weights; so do we.
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.initialize_state(param, keeps_remainders(inner, param))
        return
    if getattr(sub, "init_state_fn", None) is not None:
        sub.init_state_fn(sub.optimizer, sub.config)


def _uses_torch_adam(sub) -> bool:
    """torch's Adam keeps `step` per parameter; TE/apex fused Adam keep it per param group."""
    return type(sub.optimizer).__module__.startswith("torch.optim")


def _step_of(sub) -> int:
    for state in sub.optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return max((int(g.get("step", 0)) for g in sub.optimizer.param_groups), default=0)


def _set_adam_step(sub, step: int) -> None:
    if _uses_torch_adam(sub):
        for state in sub.optimizer.state.values():
            # One tensor per parameter: torch's Adam increments it in place.
            state["step"] = torch.tensor(float(step))
        return
    # TE/apex FusedAdam add the key on their first step; a resumed optimizer has not stepped
    # yet, and without it would restart Adam's bias correction at step 1.
    for group in sub.optimizer.param_groups:
        group["step"] = step
