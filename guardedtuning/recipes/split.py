"""``split`` (GuardedTuning Online without privacy knobs): bottom LoRA on the client, top LoRA
and head on the server, bottom-LoRA updates averaged; the noise-free baseline."""

from guardedtuning.recipes._split_family import BASELINE, split_recipe

RECIPE = split_recipe("split", "split learning, no privacy knobs (the noise-free baseline)", dict(BASELINE))
