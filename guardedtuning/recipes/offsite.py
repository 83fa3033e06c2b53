"""``offsite`` (GuardedTuning Offline, offsite tuning): the provider sends each client, once, an
emulator of its middle blocks between the first and last ``a`` blocks; clients fine-tune LoRA on
those end blocks (and the head) locally with DP-SGD and send the adapter updates through secure
aggregation; the server plugs the aggregate into its full model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardedtuning.recipes._split_family import FULL_CUT
from guardedtuning.recipes.base import ADAPTER_UPDATES, Recipe

if TYPE_CHECKING:
    from guardedtuning.config import RunConfig
    from guardedtuning.models.exposure import WeightCounts


def held(cfg: RunConfig, w: WeightCounts) -> int:
    """Embeddings, the first and last ``a`` blocks, the emulator's blocks, the final norm / untied head."""
    blocks = 2 * cfg.offsite.adapter_layers + cfg.offsite.emulator_layers
    return w.embeddings + blocks * w.block + w.norm + w.untied_head


def shape(cfg: RunConfig) -> str:
    a = cfg.offsite.adapter_layers
    return f", emulator: {a}+{cfg.offsite.emulator_layers}+{a} blocks"


def preflight(cfg: RunConfig, kind: str, depth: int) -> None:
    from guardedtuning.models.emulator import check_offsite_layers

    check_offsite_layers(cfg.offsite, depth, cfg.model.name)


RECIPE = Recipe(
    name="offsite", summary="offsite tuning: adapters trained locally on an emulator, plugged into the full model",
    overrides={
        "privacy.mechanism": "none", "dp.enabled": True, "dp.target-epsilon": 8.0, "dp.delta": 1e-5,
        "dp.max-grad-norm": 1.0, "aggregation.secure": True, "aggregation.density": 1.0, "aggregation.bits": 8,
        **FULL_CUT,
        "offsite.adapter-layers": 1, "offsite.emulator-layers": 2, "offsite.adapter": "lora",
    },
    driver="guardedtuning.server_app.offsite_driver:run_offsite",
    handlers={"train.offsite": "guardedtuning.clients.offsite_client:handle_offsite_train"},
    dp_scope=("the adapter updates of each client (add/remove one of its examples), with amplification by "
              "Poisson sampling; nothing else leaves the client"),
    attack_surface=(ADAPTER_UPDATES,), held_weights=held, shape=shape, preflight=preflight,
)
