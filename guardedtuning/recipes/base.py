"""What a design declares: :class:`Recipe`, one instance per module of this package.

A recipe owns everything that differs between designs: the run-config overrides it
starts from, the knobs it accepts, its server driver and client handlers (named by
import path, ``"module:function"``, the way Flower names a ServerApp in pyproject, so
this package sits below the drivers and handlers that implement it), its message types,
the part of the provider's model a client holds, its banner line and what the privacy
attacks can target. Nothing outside this package compares recipe names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

from guardedtuning.errors import ConfigError
from guardedtuning.privacy.attacks import ADAPTER_UPDATES, RELEASED_ACTIVATIONS  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from guardedtuning.config import RunConfig
    from guardedtuning.models.exposure import WeightCounts


def resolve(path: str) -> Any:
    """The object named ``"package.module:attribute"``."""
    module, _, attr = path.partition(":")
    return getattr(import_module(module), attr)


def _no_check(cfg: RunConfig) -> None:
    return None


def _no_preflight(cfg: RunConfig, kind: str, depth: int) -> None:
    return None


def _no_shape(cfg: RunConfig) -> str:
    return ""


@dataclass(frozen=True)
class Recipe:
    """One design: its facts, its knobs and where its code lives.

    Parameters
    ----------
    name : str
        The recipe's name (``--recipe NAME``, ``recipe = "NAME"``).
    summary : str
        One line for ``guardedtuning recipes`` and the docs.
    overrides : Mapping[str, Any]
        Run-config keys this recipe sets on top of the defaults (``[tool.flwr.app.config]``).
    driver : str
        ``"module:function"`` of the server side, ``function(grid, run) -> metrics``
        (``grid`` is None for a recipe that is not federated).
    handlers : Mapping[str, str]
        Message type (``"train.split"``) -> ``"module:function"`` of its ClientApp handler.
    federated : bool
        False for a single-process recipe (no clients, no Flower).
    releases_activations : bool
        Clients release cut activations, so the token mechanism (``privacy.mechanism``,
        ``privacy.quantize-bits``) applies.
    trains_bottom : bool
        The client's bottom is trained through the cut, so NoPeek (``privacy.nopeek-weight``) applies.
    dp_scope : str or None
        What DP-SGD's (epsilon, delta) covers in this design; None: ``dp.*`` does not apply.
    release_scope : str
        How often an example's activations are released (the token guarantee's composition).
    attack_surface : tuple of str
        What the privacy attacks can target (:data:`RELEASED_ACTIVATIONS`, :data:`ADAPTER_UPDATES`).
    held_weights : callable or None
        ``(cfg, counts) -> parameters`` of the provider's backbone a client holds; None: no client.
    shape : callable
        ``cfg -> str``: the banner's description of the model's cut (``", cut after 2"``).
    check : callable
        ``cfg -> None``: this design's own knob checks (raise :class:`ConfigError`).
    preflight : callable
        ``(cfg, kind, depth) -> None``: checks that need the model's config, before Flower starts.
    """

    name: str
    summary: str
    driver: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    handlers: Mapping[str, str] = field(default_factory=dict)
    federated: bool = True
    releases_activations: bool = False
    trains_bottom: bool = False
    dp_scope: str | None = None
    release_scope: str = ""
    attack_surface: tuple[str, ...] = ()
    held_weights: Callable[[RunConfig, WeightCounts], int] | None = None
    shape: Callable[[RunConfig], str] = _no_shape
    check: Callable[[RunConfig], None] = _no_check
    preflight: Callable[[RunConfig, str, int], None] = _no_preflight

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum():
            raise ValueError(f"`name` should be a word like 'split' but is {self.name!r}")
        if not self.federated and self.handlers:
            raise ValueError(f"recipe {self.name!r} is not federated but declares client handlers")

    @property
    def accepts_dp(self) -> bool:
        return self.dp_scope is not None

    def run(self, grid: Any, run: Any) -> dict[str, float]:
        """Run the server side (the driver named by :attr:`driver`; one that is not federated gets no grid)."""
        driver = resolve(self.driver)
        return driver(grid, run) if self.federated else driver(run)

    def client_handlers(self) -> dict[str, Callable[..., Any]]:
        """Message type -> ClientApp handler function."""
        return {mtype: resolve(path) for mtype, path in self.handlers.items()}

    def exposure(self, cfg: RunConfig) -> float | None:
        """The fraction of the provider's weights a client of this design receives (None: no client)."""
        if self.held_weights is None:
            return None
        from guardedtuning.models.exposure import weight_counts

        counts = weight_counts(cfg.model)
        return self.held_weights(cfg, counts) / counts.total

    def validate(self, cfg: RunConfig) -> None:
        """The knobs of ``cfg`` this design cannot honour raise :class:`ConfigError`, naming the fix."""
        p, name = cfg.privacy, self.name
        if self.federated and cfg.aggregation.secure and cfg.federation.clients_per_round < 2:
            raise ConfigError(
                "`aggregation.secure` is true but federation.clients-per-round is "
                f"{cfg.federation.clients_per_round}; one client has no one to hide among: sample at least 2 "
                "clients per round or set --set aggregation.secure=false"
            )
        if not self.releases_activations and (p.mechanism != "none" or p.quantize_bits):
            raise ConfigError(
                f"recipe {name!r} releases no activations, but privacy.mechanism={p.mechanism!r} / "
                f"privacy.quantize-bits={p.quantize_bits} act on released activations; set --set "
                "privacy.mechanism=none privacy.quantize-bits=0 (guardedtuning run --recipe NAME does), or use a "
                "recipe that releases activations (split, privtune, guarded, gradfree)"
            )
        if not self.trains_bottom and p.nopeek_weight > 0:
            raise ConfigError(
                f"`privacy.nopeek-weight` is {p.nopeek_weight} but recipe {name!r} trains no client bottom "
                "through the cut, so a decorrelation term has nothing to shape; set --set privacy.nopeek-weight=0"
            )
        if cfg.split.release_dim and not self.trains_bottom:
            raise ConfigError(
                f"`split.release-dim` is {cfg.split.release_dim} but recipe {name!r} trains no client bottom through "
                "the cut, so a release projection could not learn; set --set split.release-dim=0, or use split, "
                "privtune or guarded"
            )
        if cfg.split.release_dim and p.mechanism == "privtune":
            raise ConfigError(
                f"`split.release-dim` is {cfg.split.release_dim} but privacy.mechanism is 'privtune', whose mean "
                "table and token importance live in the D-dimensional space of the vocabulary; use --set "
                "privacy.mechanism=dchi (uniform eta in the released space) or split.release-dim=0"
            )
        if not self.accepts_dp and cfg.dp.enabled:
            raise ConfigError(
                f"`dp.enabled` is true but recipe {name!r} has no client-side training for DP-SGD to protect; set "
                "--set dp.enabled=false (guardedtuning run --recipe NAME does)"
            )
        self.check(cfg)
