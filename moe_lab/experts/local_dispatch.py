"""Token permutation for experts that all live on this rank, without host synchronisation.

megatron's alltoall and allgather dispatchers copy the tokens-per-expert counts to the host in
every MoE layer and wait for them (TE's grouped GEMM takes them as a Python list, and the
exchange between ranks needs them to size its buffers). With one expert rank (ep=1, etp=1) there
is no exchange, and the torch backend's grouped GEMM reads the counts on the GPU; so nothing in
the layer needs the host to wait, and the host can queue the forward pass (of the next step too,
while the GPU still runs the optimizer) ahead of the GPU (docs/performance.md has the numbers).

`LocalTokenDispatcher` does megatron's own sync-free permutation (`moe_utils.permute` by argsort
with the dropless output size, tokens x topk) and its inverse; `TorchMoELayer` is megatron's
MoELayer that uses it where it applies and megatron's dispatcher everywhere else (expert
parallelism, token dropping, padded routing, shared-expert overlap).
"""

from __future__ import annotations

import torch
from megatron.core import utils
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    get_default_pg_collection,
    permute,
    unpermute,
)
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


class LocalTokenDispatcher(MoETokenDispatcher):
    """Tokens sorted by expert and back, on this rank, counts left on the GPU."""

    @staticmethod
    def applies(config, pg_collection) -> bool:
        """One expert rank, dropless routing without padding, no shared-expert overlap."""
        one_rank = all(utils.get_pg_size(g) == 1
                       for g in (pg_collection.ep, pg_collection.expt_tp, pg_collection.tp_ep))
        return (one_rank and config.moe_expert_capacity_factor is None
                and not config.moe_pad_expert_input_to_capacity
                and not config.moe_router_padding_for_quantization
                and not config.moe_shared_expert_overlap)

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        hidden_TH = hidden_states.view(-1, self.hidden_shape[-1])
        self.routing_map = routing_map
        # Dropless routing: every token has exactly topk experts, so the size is static.
        num_out = routing_map.shape[0] * self.config.moe_router_topk
        permuted, permuted_probs, self.sorted_indices, _, _ = permute(
            hidden_TH, routing_map, probs=probs, num_out_tokens=num_out)
        return permuted, permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens_per_expert = self.routing_map.sum(dim=0)  # stays on the GPU
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # the experts already weighted their outputs by the routing probabilities
        flat_shape = torch.Size((self.hidden_shape[:-1].numel(), self.hidden_shape[-1]))
        output = unpermute(hidden_states, self.sorted_indices, restore_shape=flat_shape,
                           routing_map=self.routing_map)
        return output.view(self.hidden_shape)


class TorchMoELayer(MoELayer):
    """megatron's MoELayer, with LocalTokenDispatcher where `LocalTokenDispatcher.applies`."""

    def __init__(self, config, submodules, layer_number=None, pg_collection=None, **kwargs):
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        if LocalTokenDispatcher.applies(config, pg_collection):
            self.token_dispatcher = LocalTokenDispatcher(config, pg_collection)
