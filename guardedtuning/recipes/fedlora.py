"""``fedlora``: plain federated LoRA, each client trains LoRA on the whole model locally and the
server averages the adapter updates; the federated baseline, no privacy knobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardedtuning.recipes._split_family import BASELINE
from guardedtuning.recipes.base import Recipe

if TYPE_CHECKING:
    from guardedtuning.config import RunConfig
    from guardedtuning.models.exposure import WeightCounts


def held(cfg: RunConfig, w: WeightCounts) -> int:
    return w.total  # the whole backbone


RECIPE = Recipe(
    name="fedlora", summary="federated LoRA on the whole model (the FL baseline)", overrides=dict(BASELINE),
    driver="guardedtuning.server_app.fedlora_driver:run_fedlora",
    handlers={"train": "guardedtuning.clients.fedlora_client:handle_fedlora_train"},
    held_weights=held,
)
