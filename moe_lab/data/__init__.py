"""Training data: tokenizers, megatron indexed datasets and their blends, the built-in corpus.

The loop asks `build_data_source(cfg, cache_dir)` for a source (synthetic tokens for an empty
data.blend, megatron-core GPTDatasets otherwise) and reads `batches(step, dp_rank, dp_size)` and
`valid_batches(dp_rank, dp_size)` from it. `moe-lab data prepare` / `data builtin` write the
datasets (prepare.py, builtin.py).
"""

from moe_lab.data.errors import DataError
from moe_lab.data.source import DataSource, SyntheticSource, build_data_source, check_data
from moe_lab.data.synthetic import SyntheticTokens, batch_indices

__all__ = ["DataError", "DataSource", "SyntheticSource", "SyntheticTokens", "batch_indices",
           "build_data_source", "check_data"]
