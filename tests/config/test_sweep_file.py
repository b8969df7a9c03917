"""Sweep files: members from a grid and a list, stable ids, errors that name the key.

Run: pytest tests/config/test_sweep_file.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_lab.config import ConfigError
from moe_lab.config.sweep import load_sweep, override_args

from ..conftest import TINY_MOE


def _sweep(tmp_path: Path, **sweep) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"sweep": {"name": "s", "base": TINY_MOE, **sweep}},
                                   sort_keys=False))
    return path


def test_sweep_members_from_grid_and_list_with_stable_ids(tmp_path):
    path = _sweep(tmp_path, overrides={"training.max_steps": 10},
                  grid={"optimizer.lr": [1.0e-3, 3.0e-3], "moe.topk": [1, 2]},
                  members=[{"name": "wide", "moe.expert_ffn": 64}])
    sweep = load_sweep(path)
    assert [m.name for m in sweep.members] == [
        "lr=0.001,topk=1", "lr=0.001,topk=2", "lr=0.003,topk=1", "lr=0.003,topk=2", "wide"]
    assert all(m.config.training.max_steps == 10 for m in sweep.members)
    assert sweep.members[-1].config.moe.expert_ffn == 64
    assert len({m.id for m in sweep.members}) == 5
    # An added member leaves the others' ids (and so their run directories) alone.
    path.write_text(path.read_text().replace("members:", "members:\n  - {name: deep, "
                                                         "model.num_layers: 2}"))
    again = load_sweep(path)
    assert {m.id for m in sweep.members} < {m.id for m in again.members}
    assert again.id == sweep.id


def test_override_args_read_back_to_the_same_values():
    from moe_lab.config.loader import _parse_override

    values = {"a": "true", "b": "1e-3", "c": "topk_softmax", "d": [1, 2], "e": {"name": "x"},
              "f": None, "g": 3.0e-4, "h": "a: b"}
    assert dict(_parse_override(arg) for arg in override_args(values)) == values


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"optimizer.lr": []}}, "sweep.grid.optimizer.lr: needs a non-empty list"),
    ({"grid": {}}, "sweep: has no members"),
    ({"gird": {"optimizer.lr": [1]}}, "sweep.gird: unknown key"),
    ({"members": [{"moe.topk": 1}]}, "sweep.members[0]: needs a name"),
    ({"members": [{"name": "a", "moe.topk": 9}]}, "member a: moe.topk: 9 exceeds num_experts 8"),
    ({"members": [{"name": "a", "moe.topk": 1}, {"name": "b", "moe.topk": 1}]},
     "members a and b have the same overrides"),
])
def test_bad_sweep_files_name_the_key(tmp_path, sweep, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(_sweep(tmp_path, **sweep))
