"""The model parts each role holds, built once per process and cached.

- a client in ``split`` holds only the bottom, with LoRA: :func:`client_bottom`;
- the server in ``split`` holds the bottom (to evaluate the assembled model) and the
  top, with LoRA on the top blocks and a trainable head: :func:`split_model`;
- ``fedlora`` clients and the server hold the whole model with LoRA everywhere, and
  ``central-ft`` trains every weight: :func:`split_model` too (with other flags).

Clients run many messages against one process (a Ray actor serves many simulated
clients), so the built part is cached and each client's adapter weights are loaded
into it per message: base weights are read once per process, never per message.

``model.dtype``: the frozen base weights load in that dtype (float16 only on a GPU: a
ConfigError on a CPU); LoRA, the release maps and the encoder's head are float32. ``full=True``
(central fine-tuning) trains every weight, so it loads float32 whatever ``model.dtype`` says.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

from guardedtuning.config import LoraConfig, ModelConfig, SplitConfig
from guardedtuning.models.loading import load_backbone, torch_dtype
from guardedtuning.models.lora import add_lora
from guardedtuning.models.split import Bottom, Top, build_split, check_split_layer

if TYPE_CHECKING:
    from transformers.cache_utils import Cache


class SplitModel(nn.Module):
    """Bottom then top: the model assembled exactly as it is used."""

    def __init__(self, bottom: Bottom, top: Top) -> None:
        super().__init__()
        self.bottom = bottom
        self.top = top
        self.kind = bottom.kind

    def per_example_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
        return self.top.per_example_loss(self.bottom(input_ids, attention_mask), attention_mask, labels)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.top.logits(self.bottom(input_ids, attention_mask), attention_mask)

    def new_cache(self) -> Cache:
        """An empty key/value cache for :meth:`next_token_logits` (decoders)."""
        from transformers.cache_utils import DynamicCache

        if self.kind != "decoder":
            raise ValueError("a key/value cache is for decoders (incremental generation); this model is an encoder")
        return DynamicCache(config=self.bottom.blocks.config)

    def next_token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Incremental decoding: the new positions' ids (B, T) -> the last one's next-token logits (B, V).

        ``attention_mask`` (B, past + T) covers the positions ``cache`` holds and the new ones;
        bottom and top share ``cache`` (keys and values by the backbone's layer index), as the
        unsplit model's layers share theirs, and the call appends the new positions to it.
        """
        return self.top.next_token_logits(self.bottom(input_ids, attention_mask, cache), attention_mask, cache)


def _device(name: str) -> torch.device:
    return torch.device(name)


def _cut(split: SplitConfig | int) -> tuple[int, int]:
    """(layer, release_dim) of ``split``: a :class:`SplitConfig`, or a bare layer (no release projection)."""
    return (split, 0) if isinstance(split, int) else (split.layer, split.release_dim)


def _train_release_maps(bottom: Bottom, top: Top | None = None) -> None:
    """The release projection (client) and its expansion (server) train, whatever else is frozen."""
    for module in (bottom.project, top.expand if top is not None else None):
        if module is not None:
            module.requires_grad_(True)


@functools.lru_cache(maxsize=2)
def client_bottom(model: ModelConfig, split: SplitConfig | int, lora: LoraConfig, device: str, seed: int) -> Bottom:
    """The client's bottom with LoRA (blocks above the cut are dropped), and its release projection.

    Its LoRA initialisation does not matter (every round starts from the global adapter)
    and, like every builder here, it leaves the process's random state untouched.
    """
    layer, release_dim = _cut(split)
    dtype = torch_dtype(model.dtype, device)  # float16 on a CPU fails here
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = load_backbone(model.name, num_layers=model.num_layers, seed=seed)
        check_split_layer(layer, backbone.num_layers, backbone.name)
        bottom = Bottom(backbone, layer, release_dim=release_dim, seed=seed, dtype=dtype)
        bottom.to(_device(device))  # device before LoRA: see opacus issue 820
        add_lora(bottom, lora, backbone.kind)
        _train_release_maps(bottom)
    bottom.eval()  # no dropout: the forward of step s is recomputed in step s + 1
    return bottom


def split_model(
    model: ModelConfig, split: SplitConfig | int, lora: LoraConfig, num_labels: int, device: str, seed: int,
    *, lora_bottom: bool = True, lora_top: bool = True, full: bool = False,
) -> SplitModel:
    """A fresh bottom + top (not cached: servers build it once, fedlora clients cache it).

    ``full=True`` makes every weight trainable (central fine-tuning) and adds no LoRA.
    The head is trainable whenever the task has one (encoders). Initialisation is seeded
    and leaves the process's random state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        return _split_model(model, split, lora, num_labels, device, seed, lora_bottom=lora_bottom,
                            lora_top=lora_top, full=full)


def _split_model(
    model: ModelConfig, split: SplitConfig | int, lora: LoraConfig, num_labels: int, device: str, seed: int,
    *, lora_bottom: bool, lora_top: bool, full: bool,
) -> SplitModel:
    layer, release_dim = _cut(split)
    dtype = torch_dtype("float32" if full else model.dtype, device)  # every weight trains: float32
    backbone = load_backbone(model.name, num_layers=model.num_layers, seed=seed)
    torch.manual_seed(seed)  # the head's initialisation
    bottom, top = build_split(backbone, layer, num_labels, release_dim=release_dim, seed=seed, dtype=dtype)
    out = SplitModel(bottom, top).to(_device(device))
    if full:
        for p in out.parameters():
            p.requires_grad_(True)
        if backbone.kind == "decoder":  # tied with the input embeddings; train once
            top.head.weight.requires_grad_(True)
        out.eval()
        return out
    for p in out.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed + 1)  # LoRA A matrices
    if lora_bottom:
        add_lora(bottom, lora, backbone.kind)
    if lora_top:
        add_lora(top.blocks, lora, backbone.kind)
    if backbone.kind == "encoder":
        top.head.requires_grad_(True)
    _train_release_maps(bottom, top)
    out.eval()
    return out


@functools.lru_cache(maxsize=2)
def client_full_model(model: ModelConfig, layer: SplitConfig | int, lora: LoraConfig, num_labels: int,
                      device: str, seed: int) -> SplitModel:
    """``fedlora`` clients: the whole model with LoRA, cached per process."""
    return split_model(model, layer, lora, num_labels, device, seed)
