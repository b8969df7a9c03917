"""Token ids for routers that route by token (`hash`): a side channel from the model's input.

A megatron router is called with hidden states only. `attach(model, config)` registers a forward
pre-hook on the GPTModel that publishes each micro-batch's `input_ids` (the tensor the embedding
stage embeds) before any layer runs; routers with `NEEDS_TOKEN_IDS` read them with
`current(num_tokens)`. The ids are laid out exactly as the router sees tokens:

1. [batch, seq] -> [seq, batch], megatron's sequence-first activation layout;
2. under sequence parallelism, split along the sequence with megatron's
   `scatter_to_sequence_parallel_region`, the same call that splits the embedding output (and
   GPTModel's padding mask), so TP rank r gets the ids of its own sequence shard;
3. flattened, as the router flattens [seq, batch, hidden] to [tokens, hidden].

Later pipeline stages: megatron sends only hidden states between stages, but moe-lab's forward
step gives every stage its micro-batch's `input_ids` (megatron-LM gives them to the first and
last stage only), so the hook publishes them on every stage, for the same micro-batch the stage
is about to run. Pipeline schedules run one micro-batch's forward on a stage at a time.

Limits (refused by the hash router's config check): activation recompute replays a layer during
backward, when the channel may hold a later micro-batch's ids; context parallelism splits
sequences in an order this channel does not reproduce.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

_published: torch.Tensor | None = None


def publish(input_ids: torch.Tensor, sequence_parallel: bool = False, tp_group=None) -> None:
    """Make `input_ids` [batch, seq] the ids of the tokens routed next."""
    global _published
    ids = input_ids.detach().transpose(0, 1).contiguous()
    if sequence_parallel:
        ids = scatter_to_sequence_parallel_region(ids, group=tp_group)
    _published = ids.reshape(-1)


def current(num_tokens: int) -> torch.Tensor:
    """The published ids, [num_tokens]; a clear error when none match the router's tokens."""
    if _published is None:
        raise RuntimeError("token ids: none published; the model needs "
                           "moe_lab.routers.token_ids.attach(model, config) (build_model does it)")
    if _published.numel() != num_tokens:
        raise RuntimeError(f"token ids: {_published.numel()} published for a router call of "
                           f"{num_tokens} tokens")
    return _published


def clear() -> None:
    global _published
    _published = None


def attach(model: torch.nn.Module, config) -> torch.utils.hooks.RemovableHandle:
    """Publish the ids of every forward of `model` (a GPTModel) before it runs."""
    tp_group = getattr(getattr(model, "pg_collection", None), "tp", None)

    def hook(module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            raise RuntimeError("token ids: this pipeline stage was called without input_ids")
        publish(input_ids, config.sequence_parallel, tp_group)

    return model.register_forward_pre_hook(hook, with_kwargs=True)
