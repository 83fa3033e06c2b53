"""The recipe registry: one module per design in this package, each exporting ``RECIPE``.

Adding a design means adding one module here (a :class:`~guardedtuning.recipes.base.Recipe`
whose driver and handlers name their code); the registry finds it, the ServerApp runs its
driver, the ClientApp registers its handlers, the CLI lists it and validates its knobs.

:func:`build_config` is the validated run config: the structural checks of
:func:`guardedtuning.config.build_config`, then the recipe's own.
"""

from __future__ import annotations

import functools
import pkgutil
from collections.abc import Mapping
from importlib import import_module
from typing import Any

from guardedtuning.config import RunConfig
from guardedtuning.config import build_config as build_structural
from guardedtuning.errors import ConfigError
from guardedtuning.recipes.base import ADAPTER_UPDATES, RELEASED_ACTIVATIONS, Recipe, resolve

DEFAULT = "guarded"

__all__ = ["ADAPTER_UPDATES", "DEFAULT", "RELEASED_ACTIVATIONS", "Recipe", "all_recipes", "build_config",
           "config_for", "get", "names"]


@functools.cache
def all_recipes() -> dict[str, Recipe]:
    """Every recipe of this package, by name (modules ``base`` and ``_*`` excluded)."""
    out: dict[str, Recipe] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        recipe = getattr(import_module(f"{__name__}.{info.name}"), "RECIPE", None)
        if not isinstance(recipe, Recipe):
            raise RuntimeError(f"module {__name__}.{info.name} defines no RECIPE = Recipe(...)")
        if recipe.name in out:
            raise RuntimeError(f"two modules define recipe {recipe.name!r}")
        out[recipe.name] = recipe
    return out


def names() -> tuple[str, ...]:
    return tuple(all_recipes())


def get(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name lists the available ones."""
    recipes = all_recipes()
    if name not in recipes:
        raise ConfigError(f"unknown recipe {name!r}; available recipes: {', '.join(sorted(recipes))}; "
                          "pass --recipe NAME")
    return recipes[name]


def build_config(overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A :class:`RunConfig` from flat run-config keys, checked structurally and by its recipe."""
    cfg = build_structural(overrides)
    get(cfg.recipe).validate(cfg)
    return cfg


def config_for(name: str, sets: Mapping[str, Any] | None = None) -> RunConfig:
    """Recipe ``name``'s overrides, then ``sets`` (e.g. ``--set`` values), on top of the defaults."""
    flat: dict[str, Any] = {**get(name).overrides, "recipe": name}
    flat.update(sets or {})
    return build_config(flat)


def message_handlers() -> dict[str, Any]:
    """Message type -> ClientApp handler, over every recipe (designs may share a message type)."""
    out: dict[str, Any] = {}
    for recipe in all_recipes().values():
        for mtype, path in recipe.handlers.items():
            if out.setdefault(mtype, path) != path:
                raise RuntimeError(f"message type {mtype!r} has two handlers: {out[mtype]} and {path}")
    return {mtype: resolve(path) for mtype, path in out.items()}
