"""Helpers for tests: launching real multi-process runs, reading their metrics."""

from moe_lab.testing.crash import run_cli_crashable
from moe_lab.testing.distributed import run_cli, run_distributed, run_srun_style

__all__ = ["run_cli", "run_cli_crashable", "run_distributed", "run_srun_style"]
