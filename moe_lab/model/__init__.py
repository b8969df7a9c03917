"""Model building: experiment config -> megatron TransformerConfig + layer specs -> GPTModel.

The only builder of TransformerConfig in moe_lab. `backend` (local | te) picks the layer spec in
`spec.py`; routers come from `moe_lab.routers`.
"""

from moe_lab.model.build import build_model, build_transformer_config

__all__ = ["build_model", "build_transformer_config"]
