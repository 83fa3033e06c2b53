"""Model-IP exposure: the fraction of the provider's weights each recipe puts on a client.

The provider's weights are the pretrained backbone: embeddings, the L blocks, the final
norm and (decoders) an untied LM head. A new task head is not the provider's and counts
in neither part. Counted from the model's architecture on the ``meta`` device (no weights
are read). Which parts a client holds is each recipe's ``held_weights``
(:mod:`guardedtuning.recipes`): the split family the bottom, ``gradfree`` the bottom and an
untied LM head, ``fedlora`` everything, ``offsite`` the ends and the emulator (distilled
blocks count as exposed), ``central-ft`` no client.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from guardedtuning.config import ModelConfig
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


@functools.lru_cache(maxsize=8)
def module_names(model: ModelConfig) -> set[str]:
    """The last name part of every module of ``model``'s backbone (``query``, ``q_proj``, ...), from its config."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = load_model_config(model.name)
    if model.num_layers:
        config.num_hidden_layers = model.num_layers
    with torch.device("meta"):
        if model_kind(config, model.name) == "encoder":
            body = AutoModel.from_config(config, add_pooling_layer=False)
        else:
            body = AutoModelForCausalLM.from_config(config)
    return {name.rsplit(".", 1)[-1] for name, _ in body.named_modules() if name}
