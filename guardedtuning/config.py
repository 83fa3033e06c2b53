"""The run configuration: frozen, validated dataclasses built once from a flat run config.

Flower hands apps a flat ``run_config`` (``{"model.name": "minilm-l6", ...}``); the
same keys come from ``pyproject.toml`` (``[tool.flwr.app.config]``), from recipe files
(``simulations/recipes/*.toml``) and from ``guardedtuning run --set key=value``.
:func:`build_config` turns them into one :class:`RunConfig`; nothing else in the
package reads run-config keys by string.

A key is ``<section>.<field>`` with ``_`` written as ``-`` (``train.local-steps``),
or a top-level field (``recipe``, ``seed``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardedtuning.errors import ConfigError

Scalar = bool | int | float | str

RECIPES = ("split", "fedlora", "central-ft")
PACKAGE_DIR = Path(__file__).resolve().parent


def recipe_dir() -> Path:
    """``simulations/recipes`` of the source tree, or its copy inside an installed wheel."""
    for candidate in (PACKAGE_DIR.parent / "simulations" / "recipes", PACKAGE_DIR / "recipes"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("recipe folder not found; reinstall guardedtuning (pip install -e .)")


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors dataclass metadata
    return field(default=default, metadata={"help": help})


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"`{key}` must be {allowed} but is {value!r}; set it with --set {key}=...")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt(
        "minilm-l6",
        "`minilm-l6` (embedded encoder), `smollm2-135m` (embedded decoder), "
        "a local model folder, or a Hugging Face hub id",
    )
    max_length: int = _opt(64, "tokens per example after truncation")
    num_layers: int = _opt(0, "tiny test models only: 0 keeps the model's own depth")

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise _fail("model.name", self.name, "a model name, folder or hub id")
        if self.max_length < 8:
            raise _fail("model.max-length", self.max_length, "an integer >= 8")
        if self.num_layers < 0:
            raise _fail("model.num-layers", self.num_layers, "an integer >= 0")


@dataclass(frozen=True)
class SplitConfig:
    layer: int = _opt(2, "transformer blocks kept on the client (the bottom); 1 <= layer < L")

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise _fail("split.layer", self.layer, "an integer >= 1")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _opt(8, "LoRA rank r")
    alpha: float = _opt(16.0, "LoRA scaling alpha")
    dropout: float = _opt(0.0, "LoRA dropout")
    targets: str = _opt(
        "auto", "comma-separated module names to adapt; `auto` picks the attention query/value"
    )
    top: bool = _opt(True, "also put LoRA on the server's top blocks (else only the head trains)")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise _fail("lora.rank", self.rank, "a positive integer")
        if self.alpha <= 0:
            raise _fail("lora.alpha", self.alpha, "a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise _fail("lora.dropout", self.dropout, "a number in [0, 1)")
        if not self.target_list:
            raise _fail("lora.targets", self.targets, "`auto` or a list like `query,value`")

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())


@dataclass(frozen=True)
class DataConfig:
    name: str = _opt(
        "sentiment",
        "`sentiment` (embedded corpus), `synthetic` (instructions with sensitive "
        "attributes), a local .jsonl/.csv/.parquet file, or `hub:<dataset id>`",
    )
    text_field: str = _opt("text", "column holding the input text (local and hub data)")
    label_field: str = _opt("label", "column holding the label (local and hub data)")
    train_size: int = _opt(4000, "training rows kept after a seeded shuffle; 0 keeps all")
    test_size: int = _opt(500, "held-out rows for central evaluation")
    partition: str = _opt("iid", "`iid` or `dirichlet` (non-IID by label)")
    alpha: float = _opt(0.5, "Dirichlet concentration; smaller is more skewed")

    def __post_init__(self) -> None:
        if self.partition not in ("iid", "dirichlet"):
            raise _fail("data.partition", self.partition, "`iid` or `dirichlet`")
        if self.alpha <= 0:
            raise _fail("data.alpha", self.alpha, "a positive number")
        if self.train_size < 0:
            raise _fail("data.train-size", self.train_size, "an integer >= 0 (0 keeps all)")
        if self.test_size < 1:
            raise _fail("data.test-size", self.test_size, "a positive integer")


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = _opt(10, "simulated clients (SuperNodes); each holds one partition")
    clients_per_round: int = _opt(5, "clients sampled per round")
    rounds: int = _opt(5, "federated rounds")

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise _fail("federation.num-clients", self.num_clients, "a positive integer")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise _fail(
                "federation.clients-per-round",
                self.clients_per_round,
                f"between 1 and federation.num-clients ({self.num_clients})",
            )
        if self.rounds < 1:
            raise _fail("federation.rounds", self.rounds, "a positive integer")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = _opt(20, "optimizer steps per client per round")
    batch_size: int = _opt(16, "examples per client step")
    lr: float = _opt(2e-3, "client learning rate (AdamW)")
    server_lr: float = _opt(2e-3, "server learning rate for the top (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")

    def __post_init__(self) -> None:
        for key, value in (("train.local-steps", self.local_steps), ("train.batch-size", self.batch_size)):
            if value < 1:
                raise _fail(key, value, "a positive integer")
        for key, val in (("train.lr", self.lr), ("train.server-lr", self.server_lr)):
            if not val > 0:
                raise _fail(key, val, "a positive number")
        if self.weight_decay < 0:
            raise _fail("train.weight-decay", self.weight_decay, "a number >= 0")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = _opt(64, "evaluation batch size")
    max_new_tokens: int = _opt(8, "generation length for decoder evaluation")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise _fail("eval.batch-size", self.batch_size, "a positive integer")
        if self.max_new_tokens < 1:
            raise _fail("eval.max-new-tokens", self.max_new_tokens, "a positive integer")


@dataclass(frozen=True)
class CentralConfig:
    lr: float = _opt(5e-5, "learning rate of central full fine-tuning")

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise _fail("central.lr", self.lr, "a positive number")


@dataclass(frozen=True)
class SimConfig:
    num_cpus: int = _opt(1, "CPUs reserved per simulated client (Ray); sets how many run at once")
    num_gpus: float = _opt(0.0, "GPUs per client; fractions let several clients share one")
    server_device: str = _opt("auto", "`auto`, `cpu`, `cuda` or `cuda:N` for the server's compute")
    dispatch_interval: float = _opt(
        0.002, "seconds the simulation engine's dispatcher sleeps between sweeps (Flower: 0.1); 0 keeps Flower's"
    )

    def __post_init__(self) -> None:
        if self.num_cpus < 1:
            raise _fail("sim.num-cpus", self.num_cpus, "a positive integer")
        if self.num_gpus < 0:
            raise _fail("sim.num-gpus", self.num_gpus, "a number >= 0")
        if self.dispatch_interval < 0:
            raise _fail("sim.dispatch-interval", self.dispatch_interval, "a number >= 0")
        dev = self.server_device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise _fail("sim.server-device", dev, "`auto`, `cpu`, `cuda` or `cuda:N`")


@dataclass(frozen=True)
class CommConfig:
    poll_interval: float = _opt(0.002, "seconds between the ServerApp's pulls for replies")
    timeout: float = _opt(600.0, "seconds to wait for a client's reply before dropping it")

    def __post_init__(self) -> None:
        if not 0 < self.poll_interval <= 5:
            raise _fail("comm.poll-interval", self.poll_interval, "a number in (0, 5]")
        if self.timeout <= 0:
            raise _fail("comm.timeout", self.timeout, "a positive number")


@dataclass(frozen=True)
class AggregationConfig:
    strategy: str = _opt("fedavg", "`fedavg` (weighted average of adapter updates)")

    def __post_init__(self) -> None:
        if self.strategy != "fedavg":
            raise _fail("aggregation.strategy", self.strategy, "`fedavg`")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = _opt("runs/latest", "folder for results.json, plots, events and checkpoints")
    resume: bool = _opt(True, "resume from <dir>/checkpoint.pt when it exists")


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
    "output": OutputConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, validated. Build it with :func:`build_config`."""

    recipe: str = _opt("split", f"one of {', '.join(RECIPES)}")
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
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise _fail("seed", self.seed, "an integer >= 0")
        if self.recipe not in RECIPES:
            raise ConfigError(
                f"`recipe` must be one of {', '.join(RECIPES)} but is {self.recipe!r}; "
                "pass --recipe NAME"
            )

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
    out = {"recipe": f"one of {', '.join(RECIPES)}", "seed": "global seed"}
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


def recipe_path(name: str) -> Path:
    return recipe_dir() / f"{name}.toml"


def load_recipe(name: str) -> dict[str, Any]:
    """The flat overrides of a recipe (``simulations/recipes/<name>.toml``)."""
    path = recipe_path(name)
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in recipe_dir().glob("*.toml")))
        raise ConfigError(f"unknown recipe {name!r}; available recipes: {available}")
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    flat = _flatten(data)
    flat.setdefault("recipe", name)
    return flat


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_from_recipe(recipe: str, sets: Mapping[str, Any] | None = None) -> RunConfig:
    """Recipe overrides, then command-line overrides, on top of the defaults."""
    flat = load_recipe(recipe)
    flat.update(sets or {})
    return build_config(flat)
