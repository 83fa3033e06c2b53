"""Client-side steps, plain torch: what a client computes between two messages.

Split learning (``split``) runs one message per step, and each message does two things
for the same client (merged into one round trip):

1. backward of step ``s - 1``: recompute the bottom's forward on batch ``s - 1`` with
   autograd on, start the backward from the server's activation gradient
   (``h.backward(grad)``), take an optimizer step on the bottom's LoRA;
2. forward of step ``s``: compute the cut activations of batch ``s`` without autograd
   and release them.

Recomputing (instead of keeping the autograd graph between messages) keeps a client's
state small and lets any process of a Ray pool serve the next message.
"""

from __future__ import annotations

import torch
from torch import nn

from guardedtuning.data.batches import Batch
from guardedtuning.errors import MessageError


def forward_activations(bottom: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Cut activations of one batch, (B, T, D), on the CPU, without autograd."""
    b = batch.to(device)
    with torch.no_grad():
        return bottom(b.input_ids, b.attention_mask).detach().cpu()


def backward_from_server(
    bottom: nn.Module, opt: torch.optim.Optimizer, batch: Batch, grad_h: torch.Tensor, device: torch.device
) -> None:
    """Recompute the bottom on ``batch`` and back-propagate the server's gradient into it."""
    b = batch.to(device)
    opt.zero_grad(set_to_none=True)
    h = bottom(b.input_ids, b.attention_mask)  # (B, T, D)
    if tuple(grad_h.shape) != tuple(h.shape):
        raise MessageError(
            f"activation gradient has shape {tuple(grad_h.shape)} but this client's activations "
            f"have shape {tuple(h.shape)}; the server must return one gradient per released activation"
        )
    h.backward(grad_h.to(device, h.dtype))
    opt.step()
