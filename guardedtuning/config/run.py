"""The run configuration: frozen, validated dataclasses built once from a flat run config.

Flower hands apps a flat ``run_config`` (``{"model.name": "minilm-l6", ...}``); the
same keys come from ``pyproject.toml`` (``[tool.flwr.app.config]``), from each recipe's overrides
(:mod:`guardedtuning.recipes`) and from ``guardedtuning run --set key=value``.
:func:`build_config` turns them into one :class:`RunConfig`; nothing else in the
package reads run-config keys by string.

A key is ``<section>.<field>`` with ``_`` written as ``-`` (``train.local-steps``),
or a top-level field (``recipe``, ``seed``).
"""


from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardedtuning.config.fields import Scalar
from guardedtuning.config.fields import fail as _fail
from guardedtuning.config.fields import opt as _opt
from guardedtuning.config.privacy import DPConfig, PrivacyConfig, check_combination
from guardedtuning.config.sections import (
    AggregationConfig,
    CentralConfig,
    CommConfig,
    DataConfig,
    EvalConfig,
    FederationConfig,
    GradfreeConfig,
    LoraConfig,
    ModelConfig,
    OffsiteConfig,
    OutputConfig,
    SimConfig,
    SplitConfig,
    TrainConfig,
)
from guardedtuning.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the guardedtuning package


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "split": SplitConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "federation": FederationConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "central": CentralConfig,
    "sim": SimConfig,
    "comm": CommConfig,
    "aggregation": AggregationConfig,
    "privacy": PrivacyConfig,
    "dp": DPConfig,
    "gradfree": GradfreeConfig,
    "offsite": OffsiteConfig,
    "output": OutputConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, validated. Build it with :func:`build_config`."""

    recipe: str = _opt("guarded", "a recipe name (`guardedtuning recipes` lists them)")
    seed: int = _opt(0, "seed for sampling, partitioning, initialisation and batches")
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    central: CentralConfig = field(default_factory=CentralConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    gradfree: GradfreeConfig = field(default_factory=GradfreeConfig)
    offsite: OffsiteConfig = field(default_factory=OffsiteConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise _fail("seed", self.seed, "an integer >= 0")
        if not self.recipe or not self.recipe.replace("-", "").isalnum():
            raise _fail("recipe", self.recipe, "a recipe name such as guarded (`guardedtuning recipes` lists them)")
        check_combination(self.privacy, self.dp)

    def flat(self) -> dict[str, Scalar]:
        """The flat run config this object was built from (all keys, defaults filled)."""
        out: dict[str, Scalar] = {"recipe": self.recipe, "seed": self.seed}
        for section in SECTIONS:
            sub = getattr(self, section)
            for f in dataclasses.fields(sub):
                out[f"{section}.{_key(f.name)}"] = getattr(sub, f.name)
        return out


def _key(name: str) -> str:
    return name.replace("_", "-")


def _field_types() -> dict[str, tuple[str | None, str, type]]:
    """Flat key -> (section or None, field name, python type)."""
    out: dict[str, tuple[str | None, str, type]] = {
        "recipe": (None, "recipe", str),
        "seed": (None, "seed", int),
    }
    for section, cls in SECTIONS.items():
        hints = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, default in hints.items():
            out[f"{section}.{_key(name)}"] = (section, name, type(default))
    return out


FIELD_TYPES = _field_types()


def default_flat_config() -> dict[str, Scalar]:
    """Every run-config key with its default (mirrors ``[tool.flwr.app.config]``)."""
    return RunConfig().flat()


def config_help() -> dict[str, str]:
    """Flat key -> help string."""
    out = {"recipe": "a recipe name (`guardedtuning recipes` lists them)", "seed": "global seed"}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            out[f"{section}.{_key(f.name)}"] = str(f.metadata.get("help", ""))
    return out


def _coerce(key: str, value: Any, typ: type) -> Scalar:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise _fail(key, value, "true or false")
    if typ is int:
        if isinstance(value, bool):
            raise _fail(key, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _fail(key, value, "an integer")
    if typ is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise _fail(key, value, "a finite number")
        return number
    if not isinstance(value, str):
        raise _fail(key, value, "a string")
    return value


def unknown_key_error(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELD_TYPES), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `guardedtuning keys` lists them"
    return ConfigError(f"unknown run-config key `{key}`{hint}")


def build_config(overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a flat mapping of run-config keys.

    Missing keys take their defaults. An unknown key or a bad value raises
    :class:`ConfigError` naming the key, the value and what is allowed.
    """
    values: dict[str | None, dict[str, Any]] = {None: {}}
    for key, raw in (overrides or {}).items():
        if key not in FIELD_TYPES:
            raise unknown_key_error(key)
        section, name, typ = FIELD_TYPES[key]
        values.setdefault(section, {})[name] = _coerce(key, raw, typ)
    kwargs: dict[str, Any] = dict(values[None])
    for section, cls in SECTIONS.items():
        kwargs[section] = cls(**values.get(section, {}))
    return RunConfig(**kwargs)


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings from the command line (values stay strings)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value but got {item!r}; e.g. --set federation.rounds=2")
        key, value = item.split("=", 1)
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out
