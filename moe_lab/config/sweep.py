"""Sweep files (`experiments/*_ablation.yaml`): a base config, shared overrides, a grid and/or
an explicit member list, read into a validated `Sweep` of members.

    sweep:
      name: router_ablation
      base: tiny_moe.yaml                  # relative to the sweep file, or a preset name
      overrides: {training.max_steps: 300} # applied to every member
      grid: {moe.router.name: [topk_softmax, topk_sigmoid]}   # cartesian product
      members:                             # and/or explicit members: a name plus overrides
        - {name: softmax_bias, moe.router.name: topk_softmax, moe.router.expert_bias: true}

A member's id is a short hash of its resolved overrides (shared + its own + the command line's),
so the same member keeps its id, run directory and finished state when the file is edited around
it. Every member's
config is loaded here, so an unknown key or a bad value is an error naming the member and the file
before anything is launched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moe_lab.config.loader import COMMAND_LINE, _parse_override, _resolve_config_path, load
from moe_lab.config.schema import ConfigError, ExperimentConfig

_SWEEP_KEYS = ("name", "base", "overrides", "grid", "members")


@dataclass(frozen=True)
class Member:
    name: str
    overrides: dict[str, Any]  # resolved: the sweep's shared overrides, then the member's own
    config: ExperimentConfig

    @property
    def id(self) -> str:
        canonical = json.dumps(self.overrides, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:8]

    @property
    def dir_name(self) -> str:
        """`<name>-<id>`, safe as a directory name."""
        return f"{re.sub(r'[^A-Za-z0-9._=,+-]+', '_', self.name)[:80]}-{self.id}"

    def override_args(self) -> list[str]:
        return override_args(self.overrides)


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path  # the sweep file
    base: str  # the base config: an absolute file path, or a preset name
    members: tuple[Member, ...]
    command_line: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        """Stable across re-runs and added members: the name plus a hash of file, base and the
        command line's overrides (the same file run shorter is another sweep)."""
        text = f"{self.path}\n{self.base}"
        if self.command_line:
            text += "\n" + json.dumps(self.command_line, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:6]
        return f"{self.name}-{digest}"


def load_sweep(path: str | Path, command_line: list[str] = ()) -> Sweep:
    """Read and resolve a sweep file; `command_line` overrides (`key=value`) apply to every
    member after the file's own, like `train`'s overrides after its config."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict) or set(data) != {"sweep"} or not isinstance(data["sweep"], dict):
        raise ConfigError(f"{path}: a sweep file holds one mapping, `sweep:`", key="sweep")
    spec = data["sweep"]
    _check_keys(path, spec)
    base = _base(path, spec)
    shared = _mapping(path, spec, "overrides")
    cli = dict(_parse_override(item) for item in command_line)
    members = [*_grid_members(path, spec), *_listed_members(path, spec)]
    if not members:
        raise ConfigError(f"{path}: sweep: has no members (give a non-empty grid or members)",
                          key="sweep.grid")
    resolved = []
    for name, own in members:
        overrides = {**shared, **own, **cli}
        try:
            config = load(base, override_args(overrides))
        except ConfigError as err:
            # The loader blames "command line" for overrides: here they come from the sweep.
            message = str(err).removeprefix(f"{COMMAND_LINE}: ")
            raise ConfigError(f"{path}: member {name}: {message}", key=err.key) from None
        resolved.append(Member(name, overrides, config))
    _check_unique(path, resolved)
    return Sweep(str(spec["name"]), path, base, tuple(resolved), cli)


def override_args(overrides: dict[str, Any]) -> list[str]:
    """`key=value` strings that the config loader reads back to the same values."""
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if isinstance(value, str) and yaml.safe_load(value or "''") != value:
            text = json.dumps(value)  # a string that YAML would read as a number, bool, ...
        args.append(f"{key}={text}")
    return args


def _check_keys(path: Path, spec: dict) -> None:
    for key in spec:
        if key not in _SWEEP_KEYS:
            raise ConfigError(f"{path}: sweep.{key}: unknown key (valid: {', '.join(_SWEEP_KEYS)})",
                              key=f"sweep.{key}")
    for key in ("name", "base"):
        if not spec.get(key):
            raise ConfigError(f"{path}: sweep.{key}: missing", key=f"sweep.{key}")


def _base(path: Path, spec: dict) -> str:
    name = str(spec["base"])
    try:
        resolved = _resolve_config_path(name, path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: sweep.base: {err}", key="sweep.base") from None
    return str(resolved)


def _mapping(path: Path, spec: dict, key: str) -> dict:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: sweep.{key}: expected a mapping of dotted keys, got {value!r}",
                          key=f"sweep.{key}")
    return value


def _grid_members(path: Path, spec: dict) -> list[tuple[str, dict]]:
    grid = _mapping(path, spec, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.grid.{key}: needs a non-empty list of values, got "
                              f"{values!r}", key=f"sweep.grid.{key}")
    members = []
    for combination in itertools.product(*grid.values()) if grid else ():
        own = dict(zip(grid, combination))
        name = ",".join(f"{key.rpartition('.')[2]}={_short(v)}" for key, v in own.items())
        members.append((name, own))
    return members


def _listed_members(path: Path, spec: dict) -> list[tuple[str, dict]]:
    listed = spec.get("members") or []
    if not isinstance(listed, list):
        raise ConfigError(f"{path}: sweep.members: expected a list, got {listed!r}",
                          key="sweep.members")
    members = []
    for i, item in enumerate(listed):
        if not isinstance(item, dict) or not item.get("name"):
            raise ConfigError(f"{path}: sweep.members[{i}]: needs a name and overrides, e.g. "
                              f"{{name: a, optimizer.lr: 1.0e-3}}", key=f"sweep.members[{i}]")
        own = dict(item)
        members.append((str(own.pop("name")), own))
    return members


def _check_unique(path: Path, members: list[Member]) -> None:
    seen: dict[str, str] = {}
    for member in members:
        for label, value in (("name", member.name), ("overrides", member.id)):
            key = f"{label}:{value}"
            if key in seen:
                raise ConfigError(f"{path}: members {seen[key]} and {member.name} have the same "
                                  f"{label}", key="sweep.members")
            seen[key] = member.name


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
