"""``gradfree`` (GuardedTuning Gradfree): no gradient crosses the cut. Each round a client
releases the PrivTune-perturbed activations of its frozen bottom for all of its rows (no
labels); the server runs its frozen middle and top and returns their output hidden states;
the client trains its output adapter and head on them, with its own labels, and the
adapter-and-head updates are summed under secure aggregation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardedtuning.errors import ConfigError
from guardedtuning.recipes._split_family import FULL_CUT, cut
from guardedtuning.recipes.base import ADAPTER_UPDATES, RELEASED_ACTIVATIONS, Recipe

if TYPE_CHECKING:
    from guardedtuning.config import RunConfig
    from guardedtuning.models.exposure import WeightCounts


def held(cfg: RunConfig, w: WeightCounts) -> int:
    """The bottom, and (decoders) an untied LM head, which the output adapter feeds."""
    return w.embeddings + cfg.split.layer * w.block + w.untied_head


def preflight(cfg: RunConfig, kind: str, depth: int) -> None:
    if kind == "decoder" and cfg.gradfree.adapter_dim == 0:
        raise ConfigError(f"`gradfree.adapter-dim` is 0 but {cfg.model.name!r} is a decoder, whose head is the "
                          "frozen LM head: nothing would train; pass --set gradfree.adapter-dim=64")


RECIPE = Recipe(
    name="gradfree", summary="no gradient crosses the cut: released activations, output adapter trained locally",
    overrides={
        "privacy.mechanism": "privtune", "privacy.eta": 100.0, "privacy.rho": 1.0, "dp.enabled": False,
        # the adapter and head are small: send all of them, quantized and masked
        "aggregation.secure": True, "aggregation.density": 1.0, "aggregation.bits": 8, "gradfree.adapter-dim": 64,
        **FULL_CUT,
    },
    driver="guardedtuning.server_app.gradfree_driver:run_gradfree",
    handlers={"train.gradfree": "guardedtuning.clients.gradfree_client:handle_gradfree"},
    releases_activations=True,
    dp_scope=("the output-adapter-and-head updates of each client (add/remove one of its examples), with "
              "amplification by Poisson sampling over rows the server cannot tell apart (every row is released "
              "each round); labels never leave; the released activations are covered only by the token mechanism"),
    release_scope="every row is released once per round",
    attack_surface=(RELEASED_ACTIVATIONS, ADAPTER_UPDATES), held_weights=held, shape=cut, preflight=preflight,
)
