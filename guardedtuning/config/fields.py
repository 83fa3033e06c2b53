"""Field helpers shared by every config section: defaults with help, errors that name the key."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from guardedtuning.errors import ConfigError

Scalar = bool | int | float | str


def opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors dataclass metadata
    """A dataclass field with a default and a help string (shown by `guardedtuning keys`)."""
    return field(default=default, metadata={"help": help})


def fail(key: str, value: Any, allowed: str) -> ConfigError:
    """The error for a bad value: names the key, the value, what is allowed and how to set it."""
    return ConfigError(f"`{key}` must be {allowed} but is {value!r}; set it with --set {key}=...")
