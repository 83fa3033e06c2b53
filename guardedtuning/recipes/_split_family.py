"""What the three split-learning designs (``split``, ``privtune``, ``guarded``) share.

They run the same protocol (:mod:`guardedtuning.server_app.split_driver`,
:mod:`guardedtuning.clients.split_client`) and differ only in their privacy overrides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guardedtuning.recipes.base import ADAPTER_UPDATES, RELEASED_ACTIVATIONS, Recipe

if TYPE_CHECKING:
    from guardedtuning.config import RunConfig
    from guardedtuning.models.exposure import WeightCounts

DP_SCOPE = ("the bottom-LoRA updates of each client (add/remove one of its examples); the released activations "
            "are covered only by the token mechanism and the labels not at all")
RELEASE_SCOPE = "an example is released once each time a step samples it"

# every knob of the guarded default off; a design adds back what it uses
# the cut every other design keeps: after 2 blocks, the whole hidden state released, no token clip, and
# learning rates 2e-3 (the guarded default cuts after 4, releases a clipped 4-dim projection and, under its
# noise, trains at 5e-3)
FULL_CUT = {"split.layer": 2, "split.release-dim": 0, "privacy.clip": 0.0, "train.lr": 2e-3, "train.server-lr": 2e-3}
BASELINE = {"privacy.mechanism": "none", "dp.enabled": False, "aggregation.secure": False,
            "aggregation.density": 0.05, **FULL_CUT}


def held(cfg: RunConfig, w: WeightCounts) -> int:
    """The client holds the bottom: the embeddings and the first ``split.layer`` blocks."""
    return w.embeddings + cfg.split.layer * w.block


def cut(cfg: RunConfig) -> str:
    return f", cut after {cfg.split.layer}"


def split_recipe(name: str, summary: str, overrides: dict[str, Any]) -> Recipe:
    return Recipe(
        name=name, summary=summary, overrides=overrides,
        driver="guardedtuning.server_app.split_driver:run_split",
        handlers={"train.split": "guardedtuning.clients.split_client:handle_split_step"},
        releases_activations=True, trains_bottom=True, dp_scope=DP_SCOPE, release_scope=RELEASE_SCOPE,
        attack_surface=(RELEASED_ACTIVATIONS, ADAPTER_UPDATES), held_weights=held, shape=cut,
    )
