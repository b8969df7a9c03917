"""Token permutation for experts that all live on this rank, without host synchronisation.

megatron's alltoall and allgather dispatchers copy the tokens-per-expert counts to the host in
every MoE layer and wait for them (TE's grouped GEMM takes them as a Python list, and the
exchange between ranks needs them to size its buffers). With one expert rank (ep=1, etp=1) there
is no exchange, and the torch backend's grouped GEMM reads the counts on the GPU; so nothing in
the layer needs the host to wait, and the host can queue the forward pass (of the next step too,
while the GPU still runs the optimizer) ahead of the GPU (docs/performance.md has the numbers).

`LocalTokenDispatcher` takes megatron's sync-free sort order (`moe_utils.permute` by argsort
with the dropless output size, tokens x topk) and moves the tokens with gathers only: megatron's
`index_select` has an atomic `index_add` as its backward and its `unpermute` is an atomic
`scatter_add` (bf16 atomics, 1.8 ms a layer at Qwen1.5-MoE-A2.7B, mbs 4). Every token has
exactly topk rows, so the inverse is a gather of each token's rows followed by a sum over them
(the step's permutation work 8.9 -> 4.5 ms there, docs/performance.md).
`TorchMoELayer` is megatron's MoELayer that uses it where it applies and megatron's dispatcher
everywhere else (expert parallelism, token dropping, padded routing, shared-expert overlap).
"""

from __future__ import annotations

import torch
from megatron.core import utils
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, permute
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
        # megatron's order and probs; its token gather is done below (on zero columns here)
        _, permuted_probs, self.sorted_indices, _, _ = permute(
            hidden_TH[:, :0], routing_map, probs=probs, num_out_tokens=num_out)
        # each token's rows in the sorted order, token by token
        self.token_rows = torch.argsort(self.sorted_indices, stable=True)
        permuted = GatherRows.apply(hidden_TH, self.sorted_indices, self.token_rows)
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
        output = SumRows.apply(hidden_states, self.sorted_indices, self.token_rows,
                               self.hidden_shape[:-1].numel())
        return output.view(self.hidden_shape)


class GatherRows(torch.autograd.Function):
    """x[sorted_indices]: the rows of x [tokens, H] in expert order, every token's row `topk`
    times. The gradient gathers each token's rows (`token_rows`) and sums them."""

    @staticmethod
    def forward(ctx, x, sorted_indices, token_rows):
        ctx.save_for_backward(token_rows)
        ctx.tokens = x.shape[0]
        return x.index_select(0, sorted_indices)

    @staticmethod
    def backward(ctx, grad):
        (token_rows,) = ctx.saved_tensors
        return _sum_token_rows(grad, token_rows, ctx.tokens), None, None


class SumRows(torch.autograd.Function):
    """The way back: each token's rows of y [tokens x topk, H] summed into [tokens, H]; the
    gradient is a gather."""

    @staticmethod
    def forward(ctx, y, sorted_indices, token_rows, tokens: int):
        ctx.save_for_backward(sorted_indices)
        return _sum_token_rows(y, token_rows, tokens)

    @staticmethod
    def backward(ctx, grad):
        (sorted_indices,) = ctx.saved_tensors
        return grad.index_select(0, sorted_indices), None, None, None


def _sum_token_rows(rows: torch.Tensor, token_rows: torch.Tensor, tokens: int) -> torch.Tensor:
    return rows.index_select(0, token_rows).view(tokens, -1, rows.shape[-1]).sum(dim=1)


class TorchMoELayer(MoELayer):
    """megatron's MoELayer, with LocalTokenDispatcher where `LocalTokenDispatcher.applies`."""

    def __init__(self, config, submodules, layer_number=None, pg_collection=None, **kwargs):
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        if LocalTokenDispatcher.applies(config, pg_collection):
            self.token_dispatcher = LocalTokenDispatcher(config, pg_collection)
