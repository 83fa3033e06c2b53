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

from collections.abc import Callable

import torch
from torch import nn

from guardedtuning.data.batches import Batch
from guardedtuning.errors import MessageError
from guardedtuning.privacy.decorrelation import split_backward


def forward_activations(bottom: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Cut activations of one batch, (B, T, D), on the CPU, without autograd."""
    b = batch.to(device)
    with torch.no_grad():
        return bottom(b.input_ids, b.attention_mask).detach().cpu()


def backward_from_server(
    bottom: nn.Module, opt: torch.optim.Optimizer, batch: Batch, grad_h: torch.Tensor, device: torch.device,
    *, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Recompute the bottom on ``batch`` and back-propagate the server's gradient into it.

    ``transform`` is what the release applied to the activations before the noise (e.g.
    clipping), so the gradient is that of the released function; ``extra_loss(h)`` is a
    local term added to the server's objective (e.g. NoPeek).
    """
    if len(batch) == 0:  # an empty Poisson batch: nothing to recompute
        return
    b = batch.to(device)
    opt.zero_grad(set_to_none=True)
    h = bottom(b.input_ids, b.attention_mask)  # (B, T, D): the released forward, recomputed
    if transform is not None:
        h = transform(h)
    if tuple(grad_h.shape) != tuple(h.shape):
        raise MessageError(
            f"activation gradient has shape {tuple(grad_h.shape)} but this client's activations "
            f"have shape {tuple(h.shape)}; the server must return one gradient per released activation"
        )
    split_backward(h, grad_h.to(device, h.dtype), extra_loss=extra_loss(h) if extra_loss else None)
    opt.step()
