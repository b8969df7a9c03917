"""All local experts in two 3-D weights and two grouped GEMMs.

Shapes (E = local experts, F = expert FFN size, H = hidden, T = routed tokens on this rank):
  fc1_weight_E2FH [E, 2F, H]   gate and up projections stacked, as megatron's linear_fc1
  fc2_weight_EHF  [E, H, F]    down projection, as megatron's linear_fc2
  x_TH (tokens grouped by expert) -> grouped_mm -> [T, 2F] -> SwiGLU * prob -> grouped_mm -> [T, H]

The checkpoint layout is megatron's SequentialMLP layout (key `<prefix>experts.linear_fc1.weight`,
global shape [..., num_experts, 2F, H]), so checkpoints move freely between the local, te and
torch backends and across expert-parallel sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.module import MegatronModule


class GroupedGemmExperts(MegatronModule):
    def __init__(self, num_local_experts: int, config, *, pg_collection=None, name=None):
        super().__init__(config=config)
        if config.expert_tensor_parallel_size != 1:
            raise ValueError("model.backend=torch supports parallel.etp=1 only; "
                             "use the te backend for expert tensor parallelism")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.expt_dp_group = pg_collection.expt_dp
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        shape1, shape2 = (num_local_experts, 2 * ffn, hidden), (num_local_experts, hidden, ffn)
        self.fc1_weight = torch.nn.Parameter(torch.empty(shape1, dtype=config.params_dtype,
                                                         device=device))
        self.fc2_weight = torch.nn.Parameter(torch.empty(shape2, dtype=config.params_dtype,
                                                         device=device))
        for weight, init in ((self.fc1_weight, config.init_method),
                             (self.fc2_weight, config.output_layer_init_method)):
            for expert in weight:
                init(expert)
            # Expert weights are reduced over the expert-data-parallel group, not all of DP.
            weight.allreduce = False

    def forward(self, x_TH: torch.Tensor, tokens_per_expert: torch.Tensor,
                probs_T: torch.Tensor):
        offsets = torch.cumsum(tokens_per_expert.to(x_TH.device, non_blocking=True), 0)
        offsets = offsets.to(torch.int32)
        gate_up = F.grouped_mm(x_TH, self.fc1_weight.transpose(1, 2), offs=offsets)
        if self.config.bias_activation_fusion:
            # megatron's SwiGLU x prob: one compiled kernel each way (the prob kept in fp32), as
            # its own grouped MLPs use it, instead of ~3 passes forward and ~6 backward
            hidden = weighted_bias_swiglu_impl(gate_up, None, probs_T.unsqueeze(-1))
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up * probs_T.unsqueeze(-1).to(gate.dtype)
        return F.grouped_mm(hidden, self.fc2_weight.transpose(1, 2), offs=offsets), None

    def backward_dw(self) -> None:
        pass

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        replica_id = (0, 0, self.expt_dp_group.rank())
        state = {}
        for local_name, weight in (("fc1_weight", self.fc1_weight),
                                   ("fc2_weight", self.fc2_weight)):
            key = f"{prefix}experts.linear_{local_name[:3]}.weight"
            state[f"{prefix}{local_name}"] = ShardedTensor.from_rank_offsets(
                key, weight, *sharded_offsets, (len(sharded_offsets), ep_rank, ep_size),
                replica_id=replica_id, prepend_axis_num=len(sharded_offsets))
        return state

