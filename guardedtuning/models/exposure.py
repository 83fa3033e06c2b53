"""Model-IP exposure: the fraction of the provider's weights each recipe puts on a client.

The provider's weights are the pretrained backbone: embeddings, the L blocks, the final
norm and (decoders) an untied LM head. A new task head is not the provider's and counts
in neither part. Counted from the model's architecture on the ``meta`` device (no weights
are read), for the parts a client of each recipe holds:

- ``split``, ``privtune``, ``guarded``, ``gradfree``: the bottom (embeddings and the first
  ``split.layer`` blocks); ``gradfree`` decoders also need the LM head, which is the
  embeddings when tied and counts extra when untied;
- ``fedlora``: everything (1.0);
- ``offsite``: the embeddings, the first and last ``a`` blocks, the ``L'`` emulator blocks
  (copies of provider blocks, or distilled from them: counted as exposed) and the final
  norm / untied head;
- ``central-ft``: no client (None).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from guardedtuning.config import ModelConfig, RunConfig
from guardedtuning.models.loading import load_model_config, model_kind


@dataclass(frozen=True)
class WeightCounts:
    """Parameter counts of a backbone by part (all blocks have the same size)."""

    embeddings: int
    block: int
    blocks: int
    norm: int  # final norm (decoders)
    untied_head: int  # an LM head that is not the input embeddings (decoders), else 0

    @property
    def total(self) -> int:
        return self.embeddings + self.block * self.blocks + self.norm + self.untied_head


@functools.lru_cache(maxsize=8)
def weight_counts(model: ModelConfig) -> WeightCounts:
    """Counts for ``model`` (with ``model.num-layers`` applied), from its config alone."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = load_model_config(model.name)
    if model.num_layers:
        config.num_hidden_layers = model.num_layers
    kind = model_kind(config, model.name)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        if kind == "encoder":
            body = AutoModel.from_config(config, add_pooling_layer=False)
            return WeightCounts(count(body.embeddings), count(body.encoder.layer[0]), len(body.encoder.layer), 0, 0)
        full = AutoModelForCausalLM.from_config(config)
    body = full.model
    tied = full.lm_head.weight is body.embed_tokens.weight
    return WeightCounts(count(body.embed_tokens), count(body.layers[0]), len(body.layers), count(body.norm),
                        0 if tied else count(full.lm_head))


def model_ip_exposure(cfg: RunConfig) -> float | None:
    """The fraction of the provider's weights a client of ``cfg.recipe`` receives (None: no client)."""
    if cfg.recipe == "central-ft":
        return None
    if cfg.recipe == "fedlora":
        return 1.0
    w = weight_counts(cfg.model)
    if cfg.recipe == "offsite":
        blocks = 2 * cfg.offsite.adapter_layers + cfg.offsite.emulator_layers
        held = w.embeddings + blocks * w.block + w.norm + w.untied_head
    else:  # the split family and gradfree: the bottom
        held = w.embeddings + cfg.split.layer * w.block + (w.untied_head if cfg.recipe == "gradfree" else 0)
    return held / w.total
