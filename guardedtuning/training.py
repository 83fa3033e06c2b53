"""Plain-torch training pieces shared by the recipes (no Flower here).

- :func:`make_optimizer` and the optimizer-state round trip to numpy, so a client's
  AdamW moments survive between messages inside ``context.state``;
- :func:`local_train`: ordinary steps on a :class:`~guardedtuning.models.parts.SplitModel`
  (``fedlora`` clients and ``central-ft``); :func:`plain_steps` the same on
  :class:`~guardedtuning.privacy.local_dpsgd.LossBatch` inputs (``gradfree``, ``offsite``);
- :func:`forward_activations` and :func:`backward_from_server`: a split client's two
  halves of a step (below);
- :func:`top_step`: the server's batched top pass over all sampled clients' activations.

Split learning (``split``) runs one message per step, and each message does two things
for the same client (merged into one round trip):

1. backward of step ``s - 1``: recompute the bottom's forward on batch ``s - 1`` with
   autograd on, start the backward from the server's activation gradient
   (``h.backward(grad)``), take an optimizer step on the bottom's LoRA;
2. forward of step ``s``: compute the cut activations of batch ``s`` without autograd
   and release them.

Recomputing (instead of keeping the autograd graph between messages) keeps a client's
state small and lets any process of a Ray pool serve the next message.

Layer: plain torch over ``data``/``models``; the privacy layer
(:mod:`guardedtuning.privacy.client`) builds on it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guardedtuning.data.batches import Batch
from guardedtuning.errors import MessageError
from guardedtuning.models.split import IGNORE, Top

log = logging.getLogger(__name__)


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


class Inputs(Protocol):
    """A step's batch-first model inputs (e.g. ids, mask, labels), as a ``LossBatch`` carries them."""

    inputs: tuple[torch.Tensor, ...]


def plain_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[Inputs], device: torch.device,
                *, train_mode: bool = False) -> list[float]:
    """Plain steps on ``model.per_example_loss(*inputs).mean()``; each step's loss.

    ``train_mode``: run in train mode (dropout on) and return to eval mode afterwards;
    otherwise the model's mode is left as it is.
    """
    losses = []
    if train_mode:
        model.train()
    try:
        for batch in batches:
            inputs = tuple(t.to(device) for t in batch.inputs)
            opt.zero_grad(set_to_none=True)
            loss = model.per_example_loss(*inputs).mean()  # type: ignore[operator]
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        if train_mode:
            model.eval()
    return losses


def forward_activations(bottom: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Cut activations of one batch, (B, T, D), on the CPU, without autograd."""
    b = batch.to(device)
    with torch.no_grad():
        return bottom(b.input_ids, b.attention_mask).detach().cpu()


def split_backward(h: torch.Tensor, grad_h: torch.Tensor, *, extra_loss: torch.Tensor | None = None) -> None:
    """Back-propagate the server's activation gradient into ``h``'s graph, plus a local loss.

    The server's objective for this client is its *mean* loss over the batch, so
    ``extra_loss`` should also be a batch mean (as :func:`decorrelation_loss` is) for the
    two to be on the same scale.
    """
    if extra_loss is None:
        torch.autograd.backward([h], [grad_h])
        return
    torch.autograd.backward([h, extra_loss], [grad_h, torch.ones_like(extra_loss)])


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


TOP_GROUP_ROWS = 16
"""Rows per pass of the trimmed top (:func:`length_groups`): large enough for efficient matmuls on a CPU."""


def used_lengths(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's used length, (N, T) -> (N,): one past its last position with a mask or a label, at least 1.

    The positions after it reach no loss (no label) and no other position (no mask), so
    cutting them off changes no result.
    """
    used = attention_mask.bool()
    if labels.dim() == 2:
        used = used | (labels != IGNORE)
    pos = torch.arange(1, used.shape[1] + 1, device=used.device)
    return (used * pos).amax(1).clamp(min=1)


def length_groups(lengths: torch.Tensor, rows: int = TOP_GROUP_ROWS) -> list[tuple[torch.Tensor, int]]:
    """Row indices sorted by length (longest first), in groups of ``rows``, each with its longest length."""
    order = torch.argsort(lengths, descending=True, stable=True)
    return [(idx, int(lengths[idx[0]])) for idx in order.split(rows)]


def _content_key(a: ClientActs) -> tuple:
    """What a client sent, as exact integers: its shapes, its mask and its labels."""
    return (tuple(a.h.shape), tuple(a.attention_mask.to(torch.int64).flatten().tolist()),
            tuple(a.labels.to(torch.int64).flatten().tolist()))


def canonical_order(acts: list[ClientActs]) -> list[int]:
    """The positions of ``acts`` sorted by what each client sent, not by the order they came in.

    The key is each client's batch shape, attention mask and labels (exact integers); clients
    whose keys tie (the same shapes, mask and labels) are ordered by a digest of their
    activations' bytes, and only clients that sent the very same tensors keep the order they
    came in (swapping those changes no result but the two clients' own figures).

    Parameters
    ----------
    acts : list of ClientActs
        Each client's activations, in the order they came in (the server's is node-id order,
        and Flower's engine draws the node ids at random).

    Returns
    -------
    list of int
        A permutation of ``range(len(acts))``: ``[acts[i] for i in canonical_order(acts)]`` is
        the same list for any order of ``acts``.
    """
    keys = [_content_key(a) for a in acts]
    counts = Counter(keys)

    def key(i: int) -> tuple:
        if counts[keys[i]] == 1:
            return keys[i], b""
        h = acts[i].h.detach().cpu().float().contiguous().numpy().tobytes()
        return keys[i], hashlib.blake2b(h, digest_size=16).digest()

    return sorted(range(len(acts)), key=key)


class NonFiniteClients(ValueError):
    """Raised by :func:`top_step` *before* the top's optimizer steps: these clients poisoned the pass.

    Attributes
    ----------
    reasons : dict of int to str
        The position in ``acts`` of each offending client, and why (its mean loss or its
        activation gradient is NaN/inf). The caller drops those clients and runs the step again
        on the others; the top is unchanged.
    """

    def __init__(self, reasons: dict[int, str]) -> None:
        super().__init__("; ".join(f"client {i}: {r}" for i, r in reasons.items()))
        self.reasons = reasons


def top_step(
    top: Top,
    opt: torch.optim.Optimizer | None,
    acts: list[ClientActs],
    device: torch.device,
    *,
    trim_padding: bool = True,
) -> tuple[list[torch.Tensor], list[float]]:
    """One batched top pass over every sampled client's activations.

    The objective is the sum over clients of each client's *mean* loss, so the
    gradient a client receives for its activations is the gradient of its own mean
    loss, whatever the other clients' batch sizes. The top's gradients are divided by
    the number of clients before its optimizer step (the mean over clients).

    The top runs in train mode (its dropout and LoRA dropout on); with ``opt=None``
    (nothing on the top trains) it only computes the gradients the clients need.

    One client's rows cannot reach another's loss (attention stays within a row), so a
    non-finite loss or activation gradient names its client. Such a client is refused
    before anything steps (:class:`NonFiniteClients`); a non-finite top gradient that no
    client's own figures explain skips the optimizer step (logged), so the top never
    takes a NaN.

    Parameters
    ----------
    top : Top
        The server's part of the model.
    opt : torch.optim.Optimizer or None
        The top's optimizer; None when nothing on the top trains.
    acts : list of ClientActs
        Each client's checked activations (non-empty batches).
    device : torch.device
        Where the top runs.
    trim_padding : bool
        Compute no padding (the default): the rows of all clients, sorted by their used length
        (up to the last position with a mask or a label), go through the top in groups of
        :data:`TOP_GROUP_ROWS`, each cut to its longest row (:func:`length_groups`); False pads
        every row to the longest row of any client, as one pass. Rows never interact in the
        top, so both give the same losses and gradients up to float rounding (tested with
        dropout off); with the top's dropout on, its random masks are drawn over different
        shapes, so the two draw different (equally distributed) masks.

    The clients go through the top in :func:`canonical_order` (by what they sent), not in the
    order of ``acts``, so the result does not depend on the order they came in: the server
    takes them in node-id order and Flower's engine draws the node ids at random, and the
    top's dropout masks, the trimmed pass's length groups and the float sums followed that
    order (a client's rows got other masks; the in-process and Flower records of ``guarded``
    drifted apart by 1.5e-3 in a test loss after two rounds, tests/test_inprocess.py).

    Returns
    -------
    tuple of (list of torch.Tensor, list of float)
        Each client's activation gradient (its own (B, T, D) shape) and mean loss.

    Raises
    ------
    NonFiniteClients
        When some clients' mean loss or activation gradient is NaN/inf; the top is unchanged.
    """
    order = canonical_order(acts)
    try:
        grads, losses = _top_step(top, opt, [acts[i] for i in order], device, trim_padding=trim_padding)
    except NonFiniteClients as exc:  # positions in the canonical order -> positions in ``acts``
        raise NonFiniteClients(dict(sorted((order[j], r) for j, r in exc.reasons.items()))) from None
    back = sorted(range(len(acts)), key=order.__getitem__)  # back[i]: where acts[i] went
    return [grads[j] for j in back], [losses[j] for j in back]


def _top_step(top: Top, opt: torch.optim.Optimizer | None, acts: list[ClientActs], device: torch.device,
              *, trim_padding: bool) -> tuple[list[torch.Tensor], list[float]]:
    """:func:`top_step` on ``acts`` in the order given."""
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
        if trim_padding:
            groups = length_groups(used_lengths(mask, labels))
            parts = [top.per_example_loss(h[idx, :w], mask[idx, :w], labels[idx, :w] if labels.dim() == 2
                                          else labels[idx]) for idx, w in groups]
            order = torch.cat([idx for idx, _ in groups])
            per_example = torch.cat(parts)[torch.argsort(order)]  # (N,), back in the clients' order
        else:
            per_example = top.per_example_loss(h, mask, labels)  # (N,)
    finally:
        top.eval()
    per_client = torch.stack([chunk.mean() for chunk in per_example.split(sizes)])  # (C,)
    bad = {i: f"its mean loss on the top is {float(x)} (non-finite)"
           for i, x in enumerate(per_client.detach()) if not bool(torch.isfinite(x))}
    if bad:
        raise NonFiniteClients(bad)
    per_client.sum().backward()
    grads = [g[:, :t].detach().cpu() for g, t in zip(h.grad.split(sizes), lengths, strict=True)]  # type: ignore[union-attr]
    bad = {i: "its activation gradient from the top is non-finite" for i, g in enumerate(grads)
           if not bool(torch.isfinite(g).all())}
    if bad:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        raise NonFiniteClients(bad)
    if opt is not None:
        params = [p for p in trainable_params(top).values() if p.grad is not None]
        if all(bool(torch.isfinite(p.grad).all()) for p in params):  # type: ignore[arg-type]
            for p in params:
                p.grad.div_(len(acts))  # type: ignore[union-attr]
            opt.step()
        else:
            log.warning("top step skipped: the top's gradient is non-finite (no single client's loss is)")
            opt.zero_grad(set_to_none=True)
    return grads, [float(x) for x in per_client.detach()]
