"""``central-ft``: single-process full fine-tuning on the pooled data, the utility ceiling."""

from guardedtuning.recipes._split_family import BASELINE
from guardedtuning.recipes.base import Recipe

RECIPE = Recipe(
    name="central-ft", summary="full fine-tuning in one process on the pooled data (the utility ceiling)",
    overrides=dict(BASELINE), driver="guardedtuning.server_app.central:run_central", federated=False,
)
