"""Typed experiment configuration: schema, YAML loading with `base:` inheritance and overrides,
and numbers derived from a config before anything is built.

The only reader of YAML in moe_lab; imports nothing else from moe_lab.
"""

from moe_lab.config.derived import DerivedNumbers, derive
from moe_lab.config.loader import dump, from_dict, load, to_dict
from moe_lab.config.schema import (
    BalanceConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    TrackingConfig,
    TrainingConfig,
    UpcycleConfig,
)

__all__ = [
    "BalanceConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DerivedNumbers",
    "ExperimentConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "ParallelConfig",
    "TrackingConfig", "TrainingConfig", "UpcycleConfig", "derive", "dump", "from_dict", "load", "to_dict",
]
