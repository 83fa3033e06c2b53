"""The model parts each role holds, built once per process and cached.

- a client in ``split`` holds only the bottom, with LoRA: :func:`client_bottom`;
- the server in ``split`` holds the bottom (to evaluate the assembled model) and the
  top, with LoRA on the top blocks and a trainable head: :func:`split_model`;
- ``fedlora`` clients and the server hold the whole model with LoRA everywhere, and
  ``central-ft`` trains every weight: :func:`split_model` too (with other flags).

Clients run many messages against one process (a Ray actor serves many simulated
clients), so the built part is cached and each client's adapter weights are loaded
into it per message: base weights are read once per process, never per message.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from guardedtuning.config import LoraConfig, ModelConfig
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.lora import add_lora
from guardedtuning.models.split import Bottom, Top, build_split, check_split_layer


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


def _device(name: str) -> torch.device:
    return torch.device(name)


@functools.lru_cache(maxsize=2)
def client_bottom(model: ModelConfig, layer: int, lora: LoraConfig, device: str, seed: int) -> Bottom:
    """The client's bottom with LoRA (blocks above the cut are dropped).

    Its LoRA initialisation does not matter (every round starts from the global adapter)
    and, like every builder here, it leaves the process's random state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = load_backbone(model.name, num_layers=model.num_layers, seed=seed)
        check_split_layer(layer, backbone.num_layers, backbone.name)
        bottom = Bottom(backbone, layer)
        bottom.to(_device(device))  # device before LoRA: see opacus issue 820
        add_lora(bottom, lora, backbone.kind)
    bottom.eval()  # no dropout: the forward of step s is recomputed in step s + 1
    return bottom


def split_model(
    model: ModelConfig, layer: int, lora: LoraConfig, num_labels: int, device: str, seed: int,
    *, lora_bottom: bool = True, lora_top: bool = True, full: bool = False,
) -> SplitModel:
    """A fresh bottom + top (not cached: servers build it once, fedlora clients cache it).

    ``full=True`` makes every weight trainable (central fine-tuning) and adds no LoRA.
    The head is trainable whenever the task has one (encoders). Initialisation is seeded
    and leaves the process's random state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        return _split_model(model, layer, lora, num_labels, device, seed, lora_bottom=lora_bottom,
                            lora_top=lora_top, full=full)


def _split_model(
    model: ModelConfig, layer: int, lora: LoraConfig, num_labels: int, device: str, seed: int,
    *, lora_bottom: bool, lora_top: bool, full: bool,
) -> SplitModel:
    backbone = load_backbone(model.name, num_layers=model.num_layers, seed=seed)
    torch.manual_seed(seed)  # the head's initialisation
    bottom, top = build_split(backbone, layer, num_labels)
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
    out.eval()
    return out


@functools.lru_cache(maxsize=2)
def client_full_model(model: ModelConfig, layer: int, lora: LoraConfig, num_labels: int,
                      device: str, seed: int) -> SplitModel:
    """``fedlora`` clients: the whole model with LoRA, cached per process."""
    return split_model(model, layer, lora, num_labels, device, seed)
