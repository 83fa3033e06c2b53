"""Plain-torch training pieces shared by the recipes (no Flower here).

- :func:`make_optimizer` and the optimizer-state round trip to numpy, so a client's
  AdamW moments survive between messages inside ``context.state``;
- :func:`local_train`: ordinary steps on a :class:`~guardedtuning.models.parts.SplitModel`
  (``fedlora`` clients and ``central-ft``);
- :func:`top_step`: the server's batched top pass over all sampled clients' activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guardedtuning.data.batches import Batch
from guardedtuning.models.split import IGNORE, Top


def trainable_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def make_optimizer(module: nn.Module, *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW | None:
    """AdamW over the trainable parameters, or None when nothing in ``module`` trains."""
    params = list(trainable_params(module).values())
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None


def flat_trainable(module: nn.Module) -> torch.Tensor:
    """All trainable parameters as one CPU vector, in ``named_parameters`` order."""
    return torch.cat([p.detach().flatten().cpu() for p in trainable_params(module).values()])


def load_flat_trainable(module: nn.Module, vec: torch.Tensor) -> None:
    """Inverse of :func:`flat_trainable` (the module's layout defines the split)."""
    params = list(trainable_params(module).values())
    total = sum(p.numel() for p in params)
    if vec.numel() != total:
        raise ValueError(f"flat state has {vec.numel()} values, the model's trainable parameters {total}")
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(vec[offset: offset + p.numel()].view_as(p).to(p.device, p.dtype))
            offset += p.numel()


def optimizer_state(opt: torch.optim.Optimizer, module: nn.Module) -> dict[str, np.ndarray]:
    """AdamW's moments as one flat vector per slot (``exp_avg``, ...) and the step count.

    Few large arrays instead of one per parameter: this state crosses a (de)serialisation
    with every message, and the per-array cost dominates for LoRA-sized tensors.
    """
    params = list(trainable_params(module).values())
    if not params or not opt.state.get(params[0]):
        return {}
    out: dict[str, np.ndarray] = {}
    for slot in opt.state[params[0]]:
        if slot == "step":
            out["step"] = np.atleast_1d(opt.state[params[0]]["step"].detach().cpu().numpy()).copy()
        else:
            out[slot] = torch.cat([opt.state[p][slot].detach().flatten().cpu() for p in params]).numpy()
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, module: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`optimizer_state`."""
    if not state:
        return
    params = list(trainable_params(module).values())
    offset = 0
    for p in params:
        slots: dict[str, torch.Tensor] = {"step": torch.as_tensor(state["step"]).reshape(()).clone()}
        for slot, vec in state.items():
            if slot != "step":
                slots[slot] = torch.as_tensor(vec[offset: offset + p.numel()]).view_as(p).to(p.device, p.dtype).clone()
        opt.state[p] = slots
        offset += p.numel()


def local_train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[Batch],
    device: torch.device,
) -> list[float]:
    """Plain steps in train mode (dropout on): mean loss, backward, step. Returns each step's loss."""
    losses = []
    model.train()
    try:
        for batch in batches:
            b = batch.to(device)
            opt.zero_grad(set_to_none=True)
            loss = model.per_example_loss(b.input_ids, b.attention_mask, b.labels).mean()  # type: ignore[operator]
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
    return losses


@dataclass
class ClientActs:
    """One client's cut activations for one step, as the server receives them."""

    h: torch.Tensor  # (B, T, D)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B,) or (B, T)


def _pad_to(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    pad = width - t.shape[1]
    if pad == 0:
        return t
    spec = (0, 0, 0, pad) if t.dim() == 3 else (0, pad)
    return F.pad(t, spec, value=value)


def top_step(
    top: Top,
    opt: torch.optim.Optimizer | None,
    acts: list[ClientActs],
    device: torch.device,
) -> tuple[list[torch.Tensor], list[float]]:
    """One batched top pass over every sampled client's activations.

    The objective is the sum over clients of each client's *mean* loss, so the
    gradient a client receives for its activations is the gradient of its own mean
    loss, whatever the other clients' batch sizes. The top's gradients are divided by
    the number of clients before its optimizer step (the mean over clients).

    The top runs in train mode (its dropout and LoRA dropout on); with ``opt=None``
    (nothing on the top trains) it only computes the gradients the clients need.

    Returns each client's activation gradient (its own (B, T, D) shape) and mean loss.
    """
    width = max(a.h.shape[1] for a in acts)
    sizes = [a.h.shape[0] for a in acts]
    lengths = [a.h.shape[1] for a in acts]
    h = torch.cat([_pad_to(a.h.float(), width, 0.0) for a in acts]).to(device).requires_grad_(True)  # (N, T, D)
    mask = torch.cat([_pad_to(a.attention_mask.long(), width, 0) for a in acts]).to(device)  # (N, T)
    if acts[0].labels.dim() == 2:
        labels = torch.cat([_pad_to(a.labels.long(), width, IGNORE) for a in acts]).to(device)
    else:
        labels = torch.cat([a.labels.long() for a in acts]).to(device)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    top.train()
    try:
        per_example = top.per_example_loss(h, mask, labels)  # (N,)
    finally:
        top.eval()
    per_client = torch.stack([chunk.mean() for chunk in per_example.split(sizes)])  # (C,)
    per_client.sum().backward()
    if opt is not None:
        for p in trainable_params(top).values():
            if p.grad is not None:
                p.grad.div_(len(acts))
        opt.step()
    grads = [g[:, :t].detach().cpu() for g, t in zip(h.grad.split(sizes), lengths, strict=True)]  # type: ignore[union-attr]
    return grads, [float(x) for x in per_client.detach()]
