"""Router registry: name -> (parameter dataclass, builder).

`moe.router` in an experiment config is `{name: <registered name>, <that router's params>}`.
Unknown names and unknown parameters are one-line errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from moe_lab.config import ConfigError


@dataclass(frozen=True)
class RegisteredRouter:
    name: str
    params: type  # a frozen dataclass of the router's own parameters
    builder: Callable[[Any], Any]  # params -> megatron RouterBuilder
    transformer_config: Callable[[Any], dict[str, Any]]  # params -> TransformerConfig fields


@dataclass(frozen=True)
class RouterChoice:
    """A resolved `moe.router`: the router and its validated parameters."""

    router: RegisteredRouter
    params: Any

    def builder(self):
        return self.router.builder(self.params)

    def transformer_config_fields(self) -> dict[str, Any]:
        return self.router.transformer_config(self.params)


_ROUTERS: dict[str, RegisteredRouter] = {}


def register_router(name: str, params: type, transformer_config: Callable, builder: Callable):
    _ROUTERS[name] = RegisteredRouter(name, params, builder, transformer_config)


def resolve_router(spec: dict[str, Any]) -> RouterChoice:
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in _ROUTERS:
        raise ConfigError(f"moe.router.name: unknown router {name!r} "
                          f"(valid: {', '.join(sorted(_ROUTERS))})", key="moe.router.name")
    router = _ROUTERS[name]
    valid = [f.name for f in dataclasses.fields(router.params)]
    for key in spec:
        if key not in valid:
            raise ConfigError(f"moe.router.{key}: unknown parameter of router {name} "
                              f"(valid: {', '.join(valid) or 'none'})", key=f"moe.router.{key}")
    try:
        params = router.params(**spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"moe.router: {err}", key="moe.router") from None
    return RouterChoice(router, params)
