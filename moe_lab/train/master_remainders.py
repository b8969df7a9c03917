"""fp32 master weights kept as the bf16 weight plus 16 remainder bits (megatron-core's default
`store_param_remainders`, in Transformer Engine's FusedAdam): 2 bytes a parameter instead of 4.

The layout is TE's (`multi_tensor_adam_param_remainder`): the master weight's low 16 bits are
kept as int16; its high 16 bits, plus one when the low half's top bit is set (rounding to
nearest, ties away from zero), are the bf16 weight the model computes with. `split` and `join`
convert in torch; train/master_adamw.py's kernel does the same per element while it updates.

megatron-core 0.19.2 exchanges the master weight with checkpoints through FusedAdam's
`get_unscaled_state` / `set_scaled_state`, which hand out the int16 remainders as they are; its
parameter-space format then saves them as fp32 numbers and on load hands fp32 back, which TE
refuses (docs/performance.md). `fp32_exchange_adam` gives the optimizer a FusedAdam whose
exchange of `master_param` is the full fp32 master weight, so a checkpoint holds the same tensors
with or without the remainders and either kind of run resumes from it.
"""

from __future__ import annotations

import torch

_LOW = 0xFFFF
_HALF = 0x8000


def split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 weight, int16 remainder) of fp32 master weights."""
    bits = master.contiguous().view(torch.int32)
    low = bits & _LOW
    up = (low >= _HALF).to(torch.int32)
    remainder = (low - (up << 16)).to(torch.int16)
    weight = ((bits >> 16) + up).to(torch.int16).view(torch.bfloat16)
    return weight, remainder


def join(weight: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The fp32 master weights of bf16 weights and their int16 remainders."""
    remainder = remainder.to(torch.int32)
    high = weight.contiguous().view(torch.int16).to(torch.int32) - (remainder < 0).to(torch.int32)
    return ((high << 16) | (remainder & _LOW)).view(torch.float32)


def keeps_remainders(inner, param: torch.Tensor) -> bool:
    """Whether TE's FusedAdam `inner` keeps `param`'s master weight as remainders."""
    return bool(getattr(inner, "store_param_remainders", False)) and param.dtype == torch.bfloat16


def fp32_exchange_adam(inner):
    """The same FusedAdam (param groups, settings, empty state) whose `master_param` state goes
    to and comes from checkpoints as fp32 master weights; `inner` itself when it keeps no
    remainders or already has state."""
    if not getattr(inner, "store_param_remainders", False) or inner.state:
        return inner
    hyper = {k: inner.defaults[k] for k in ("lr", "betas", "eps", "weight_decay",
                                            "bias_correction")}
    return _fp32_exchange_class()(
        inner.param_groups, **hyper, adam_w_mode=bool(inner.adam_w_mode),
        capturable=inner.capturable, master_weights=inner.master_weights,
        master_weight_dtype=inner.master_weight_dtype, exp_avg_dtype=inner.exp_avg_dtype,
        exp_avg_sq_dtype=inner.exp_avg_sq_dtype, use_decoupled_grad=inner.use_decoupled_grad,
        store_param_remainders=True)


_CLASS = None


def _fp32_exchange_class():
    """Defined on first use: Transformer Engine is imported only where it is installed."""
    global _CLASS
    if _CLASS is None:
        from transformer_engine.pytorch.optimizers import FusedAdam

        class FusedAdamFp32Exchange(FusedAdam):
            """TE's FusedAdam; `master_param` is exchanged as fp32 master weights. TE's own
            step reads and writes the remainders as before."""

            def get_unscaled_state(self, param, state_name, skip_unscale=False):
                if state_name == "master_param" and keeps_remainders(self, param):
                    return join(param.detach(), self.state[param]["master_param"])
                return super().get_unscaled_state(param, state_name, skip_unscale)

            def set_scaled_state(self, param, state_name, unscaled_state):
                if (state_name == "master_param" and keeps_remainders(self, param)
                        and unscaled_state.dtype == torch.float32):
                    weight, remainder = split(unscaled_state.reshape(param.shape))
                    super().set_scaled_state(param, state_name, remainder)
                    # The weight is half of the master weight: a checkpoint written without
                    # remainders rounded it to nearest even, which differs on ties.
                    with torch.no_grad():
                        param.copy_(weight)
                    return
                super().set_scaled_state(param, state_name, unscaled_state)

        _CLASS = FusedAdamFp32Exchange
    return _CLASS
