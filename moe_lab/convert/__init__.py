"""Hugging Face <-> megatron checkpoints for Qwen2 and Qwen2-MoE.

One file per model family (qwen2.py, qwen2_moe.py) holds pure mappings: config fields both ways
and one `TensorMap` per tensor, so every parameter is mapped explicitly. A tensor present on
one side and not consumed on the other is an error naming it, found before anything is written.
Files: hf_files.py (safetensors directories), mcore_files.py + mcore_keys.py (dist
checkpoints), hf_to_mcore.py and mcore_to_hf.py (the two pipelines). The CLI is
`moe-lab convert` (launch/commands/convert.py); docs/conversion.md tells the story.
dense_source.py is the hook through which `moe-lab upcycle --from HF_DIR` reads a dense model.
"""

from moe_lab.convert.dense_source import read_dense_config, read_dense_tensors
from moe_lab.convert.errors import ConversionError
from moe_lab.convert.hf_to_mcore import ImportPlan, parse_layout, plan_import, write_import
from moe_lab.convert.mcore_to_hf import ExportPlan, plan_export, resolve_checkpoint, write_export

__all__ = ["ConversionError", "ExportPlan", "ImportPlan", "parse_layout", "plan_export",
           "plan_import", "read_dense_config", "read_dense_tensors", "resolve_checkpoint",
           "write_export", "write_import"]
