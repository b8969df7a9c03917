"""Reading experiment YAML: `base:` inheritance, dotted overrides, strict keys and types.

This is the only module that reads YAML. Every leaf value remembers where it was set (a file or
the command line), so an error names the key and the file to fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from moe_lab.config.schema import ConfigError, ExperimentConfig

COMMAND_LINE = "command line"
PRESETS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "presets"


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load CONFIG (a file, or a preset name) with `key=value` overrides into a validated config."""
    raw, origins = _read_with_bases(_resolve_config_path(path, Path.cwd()), chain=())
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        origins[key] = COMMAND_LINE
    try:
        return _build(ExperimentConfig, raw, prefix="", origins=origins)
    except ConfigError as err:
        raise ConfigError(f"{_origin_of(err.key, origins, path)}: {err}", key=err.key) from None


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Build a config from an already-merged mapping (e.g. a run directory's config.yaml)."""
    try:
        return _build(ExperimentConfig, raw, prefix="", origins={})
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}", key=err.key) from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump(config: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _resolve_config_path(name: str | Path, relative_to: Path) -> Path:
    candidates = [relative_to / name, Path(name)]
    if not str(name).endswith((".yaml", ".yml")):
        candidates.append(PRESETS_DIR / f"{name}.yaml")
    candidates.append(PRESETS_DIR / str(name))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(f"{name}: no such config file or preset (presets: {', '.join(presets)})")


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    if path in chain:
        cycle = " -> ".join(str(p.name) for p in (*chain, path))
        raise ConfigError(f"{path}: base: inheritance cycle {cycle}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base_name = data.pop("base", None)
    merged: dict = {}
    origins: dict[str, str] = {}
    if base_name is not None:
        base_path = _resolve_config_path(base_name, path.parent)
        merged, origins = _read_with_bases(base_path, (*chain, path))
    _merge(merged, data)
    origins.update({key: str(path) for key in _leaf_keys(data)})
    return merged, origins


def _merge(into: dict, new: dict) -> None:
    """Mappings merge recursively; lists and scalars replace."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_leaf_keys(value, dotted + "."))
    return keys


def _origin_of(key: str | None, origins: dict[str, str], default: Any) -> str:
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return str(default)


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or key.startswith("-"):
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{COMMAND_LINE}: {key}: {part} is not a section", key=key)
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, origins: dict[str, str]) -> Any:
    section = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {raw!r}", key=prefix.rstrip("."))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key (valid: {', '.join(names)})", key=dotted)
        kwargs[key] = _coerce(value, hints[key], dotted, origins)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, origins: dict[str, str]) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", origins)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, origins)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}; got {value!r}",
                              key=key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key=key)
        return dict(value)
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is type(None):
        if value is None:
            return None
    expected = getattr(hint, "__name__", str(hint)).replace("NoneType", "null")
    raise ConfigError(f"{key}: expected {expected}, got {value!r}", key=key)
