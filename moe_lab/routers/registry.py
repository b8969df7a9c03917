"""Router registry: `moe.router.name` -> a router class and its validated parameters.

`moe.router` in an experiment config is `{name: <registered name or module:Class>, <params>}`.
A name with a colon (`my_pkg.routers:MyRouter`) imports the user's class without editing moe_lab.

What the registry reads from a router class (all optional except being a megatron router: built
with `config=`, `pg_collection=`, `is_mtp_layer=`; `forward(hidden_states, padding_mask)` returns
`(probs, routing_map)`, both [tokens, experts]):
- `Params`: a frozen dataclass of the router's own parameters; the builder passes `params=`.
- `transformer_config_fields(params) -> dict`: the TransformerConfig fields the router reads.
- `check_config(params, cfg)`: raises ValueError when the experiment cannot use this router.
- `BALANCE_TERMS`: which `moe.balance` terms it takes (default: all of aux, seq_aux,
  global_aux, z, which megatron's TopKRouter plumbing provides).
- `NEEDS_TOKEN_IDS`: the router reads token ids from `moe_lab.routers.token_ids`.

Unknown names and parameters, and configs a router cannot serve, are one-line `ConfigError`s.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from moe_lab.config import ConfigError

ALL_BALANCE_TERMS = ("aux", "seq_aux", "global_aux", "z")


@dataclass(frozen=True)
class RegisteredRouter:
    name: str
    params: type | None  # a frozen dataclass of the router's own parameters, or None
    builder: Callable[[Any], Any]  # params -> megatron RouterBuilder
    transformer_config: Callable[[Any], dict[str, Any]]  # params -> TransformerConfig fields
    check: Callable[[Any, Any], None] = lambda params, cfg: None  # (params, cfg) -> raises
    balance_terms: tuple[str, ...] = ALL_BALANCE_TERMS
    needs_token_ids: bool = False


@dataclass(frozen=True)
class RouterChoice:
    """A resolved `moe.router`: the router and its validated parameters."""

    router: RegisteredRouter
    params: Any

    def builder(self):
        return self.router.builder(self.params)

    def transformer_config_fields(self) -> dict[str, Any]:
        return self.router.transformer_config(self.params)

    @property
    def needs_token_ids(self) -> bool:
        return self.router.needs_token_ids


_ROUTERS: dict[str, RegisteredRouter] = {}


def register_router_class(name: str, cls: type) -> type:
    """Register a router class under `name` (see the module docstring for what is read)."""
    _ROUTERS[name] = _from_class(name, cls)
    return cls


def registered_names() -> list[str]:
    return sorted(_ROUTERS)


def _from_class(name: str, cls: type) -> RegisteredRouter:
    params = getattr(cls, "Params", None)
    fields = getattr(cls, "transformer_config_fields", None)
    check = getattr(cls, "check_config", None)
    return RegisteredRouter(
        name=name,
        params=params,
        builder=(lambda p: partial(cls, params=p)) if params is not None else (lambda p: cls),
        transformer_config=fields if fields is not None else (lambda p: {}),
        check=check if check is not None else (lambda p, cfg: None),
        balance_terms=tuple(getattr(cls, "BALANCE_TERMS", ALL_BALANCE_TERMS)),
        needs_token_ids=bool(getattr(cls, "NEEDS_TOKEN_IDS", False)),
    )


def _import_router(path: str) -> RegisteredRouter:
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"moe.router.name: cannot import {path!r} ({err})",
                          key="moe.router.name") from None
    if not isinstance(cls, type):
        raise ConfigError(f"moe.router.name: {path!r} is not a class", key="moe.router.name")
    return _from_class(path, cls)


def resolve_router(spec: dict[str, Any], cfg=None) -> RouterChoice:
    """Validate `moe.router` (and, given the ExperimentConfig `cfg`, that the experiment's
    balance losses, capacity and layout suit the router)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if isinstance(name, str) and ":" in name:
        router = _import_router(name)
    elif name in _ROUTERS:
        router = _ROUTERS[name]
    else:
        raise ConfigError(f"moe.router.name: unknown router {name!r} (valid: "
                          f"{', '.join(sorted(_ROUTERS))}, or module.path:ClassName)",
                          key="moe.router.name")
    valid = [f.name for f in dataclasses.fields(router.params)] if router.params else []
    for key in spec:
        if key not in valid:
            raise ConfigError(f"moe.router.{key}: unknown parameter of router {name} "
                              f"(valid: {', '.join(valid) or 'none'})", key=f"moe.router.{key}")
    try:
        params = router.params(**spec) if router.params else None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"moe.router: {err}", key="moe.router") from None
    if cfg is not None:
        _check_experiment(router, params, cfg)
    return RouterChoice(router, params)


def _check_experiment(router: RegisteredRouter, params, cfg) -> None:
    for term in ALL_BALANCE_TERMS:
        if getattr(cfg.moe.balance, term) > 0 and term not in router.balance_terms:
            takes = ", ".join(router.balance_terms) or "none"
            raise ConfigError(f"moe.balance.{term}: router {router.name} does not take this loss "
                              f"(it takes: {takes}); set moe.balance.{term}=0",
                              key=f"moe.balance.{term}")
    try:
        router.check(params, cfg)
    except ValueError as err:
        raise ConfigError(str(err), key=str(err).split(":")[0]) from None
