"""Derived numbers, checked against the published sizes of the Qwen models.

Run: pytest tests/config/test_derived.py
"""

import pytest

from moe_lab import config as C


@pytest.mark.parametrize("preset, total, active", [
    ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9),  # Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B activated
    ("qwen2-57b-a14b", 57.4e9, 14.2e9),  # Qwen2-57B-A14B
    ("qwen2-0.5b", 0.494e9, 0.494e9),  # Qwen2-0.5B: 0.49B
])
def test_parameter_counts_match_published_sizes(preset, total, active):
    numbers = C.derive(C.load(preset))
    assert numbers.total_params == pytest.approx(total, rel=0.01)
    assert numbers.active_params == pytest.approx(active, rel=0.01)


def test_flops_per_token_and_experts_per_rank():
    cfg = C.load("qwen1.5-moe-a2.7b", ["parallel.ep=4"])
    numbers = C.derive(cfg)
    assert numbers.experts_per_ep_rank == 15
    attention = 6 * 24 * 4096 * 2048
    assert numbers.flops_per_token == 6 * numbers.active_matmul_params + attention
