"""A client's round, replayed with the client's own training code, for the update attacks.

The update attack must see what a client really sends: the update of a whole round of
its local training (``train.local-steps`` steps on batches of ``train.batch-size``, sampled
as the client samples them: Poisson rows under DP-SGD), under the same DP-SGD plan
(:meth:`ClientPrivacy.for_client <guardedtuning.privacy.client.ClientPrivacy.for_client>`
builds it from the run's config; a noise multiplier recorded in the run's results
replaces it where given), with the client's optimizer (:func:`~guardedtuning.training.make_optimizer`).

- split family (:func:`split_round`): per step the client releases its batch
  (:meth:`~guardedtuning.privacy.client.ClientPrivacy.release_batch`), the server's top
  computes the activation gradient as it does in a run (:func:`~guardedtuning.training.top_step`,
  nothing on the top steps) and the client applies it
  (:meth:`~guardedtuning.privacy.client.ClientPrivacy.backward`: plain, or one DP-SGD step);
- local training (:func:`local_round`, ``offsite``): :meth:`ClientPrivacy.train
  <guardedtuning.privacy.client.ClientPrivacy.train>` on the model, as the offsite client calls it.

Both return the flat update over the model's trainable tensors, and the masks and ids of
the batches that stepped (the server knows the masks of a split client's batches: it saw
their activations; for an offsite client the attacker is given them, the most it could hope for).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from guardedtuning.config import RunConfig
from guardedtuning.data.batches import Batch, Example
from guardedtuning.privacy.attacks.common import released_tensor
from guardedtuning.privacy.client import ClientPrivacy
from guardedtuning.privacy.local_dpsgd import LossBatch
from guardedtuning.privacy.mechanisms import TokenMechanism
from guardedtuning.training import ClientActs, make_optimizer, top_step

REPLAY_SEED = 4242  # the replay's noise and sampling: seeded, so an attack repeats exactly


@dataclass
class RoundUpdate:
    """One client's round: the flat update (trainable tensors in ``named_parameters`` order) and its batches."""

    update: torch.Tensor
    batches: list[Batch]
    noise_multiplier: float | None


def replay_privacy(cfg: RunConfig, *, pid: int, num_examples: int, mechanism: TokenMechanism,
                   membership_visible: bool = True, noise_multiplier: float | None = None) -> ClientPrivacy:
    """Client ``pid``'s privacy as its handler builds it (same plan), with a fixed seed for the replay.

    ``noise_multiplier``: the run's recorded one, which replaces the plan's where given.
    """
    seeded = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, noise_seed=REPLAY_SEED))
    kwargs: dict[str, Any] = {}
    if "membership_visible" in inspect.signature(ClientPrivacy.for_client).parameters:
        kwargs["membership_visible"] = membership_visible
    priv = ClientPrivacy.for_client(seeded, pid=pid, num_examples=num_examples, mechanism=mechanism, state={},
                                    **kwargs)
    if priv.plan is not None and noise_multiplier is not None and noise_multiplier != priv.plan.noise_multiplier:
        priv.plan = dataclasses.replace(priv.plan, noise_multiplier=float(noise_multiplier))
    return priv


def flat_trainable_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])


def _restore(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        start = 0
        for p in model.parameters():
            if p.requires_grad:
                n = p.numel()
                p.copy_(flat[start:start + n].view_as(p))
                start += n


def split_round(cfg: RunConfig, bottom: nn.Module, top: nn.Module, examples: Sequence[Example],
                priv: ClientPrivacy, *, round_: int, pad_id: int) -> RoundUpdate:
    """The bottom-LoRA update of one split round of a client, by its own release and backward code."""
    device = torch.device("cpu")
    start = flat_trainable_of(bottom)
    opt = make_optimizer(bottom, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if opt is None:
        raise ValueError("the bottom has no trainable tensors: load the adapter (LoRA) before the replay")
    steps, stepped = cfg.train.local_steps, []
    base = (round_ - 1) * steps
    try:
        for s in range(steps):
            g = base + s
            batch = priv.batch(list(examples), step=g, batch_size=cfg.train.batch_size, public_seed=cfg.seed,
                               pad_id=pad_id)
            if len(batch) == 0:
                continue
            h = released_tensor(priv.release_batch(bottom, batch, device, step=g))
            (grad_h,), _ = top_step(top, None, [ClientActs(h, batch.attention_mask, batch.labels)], device)
            again = priv.batch(list(examples), step=g, batch_size=cfg.train.batch_size, public_seed=cfg.seed,
                               pad_id=pad_id, again=True)
            priv.backward(bottom, opt, again, grad_h, device, step=g)
            stepped.append(batch)
        update = flat_trainable_of(bottom) - start
    finally:
        _restore(bottom, start)
    return RoundUpdate(update, stepped, priv.plan.noise_multiplier if priv.plan is not None else None)


def local_round(cfg: RunConfig, model: nn.Module, examples: Sequence[Example], priv: ClientPrivacy, *,
                round_: int, pad_id: int) -> RoundUpdate:
    """The adapter update of one round of local training (``offsite``), by :meth:`ClientPrivacy.train`."""
    device = torch.device("cpu")
    start = flat_trainable_of(model)
    opt = make_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if opt is None:
        raise ValueError("the model has no trainable tensors: add its adapters before the replay")
    steps = cfg.train.local_steps
    gsteps = [(round_ - 1) * steps + s for s in range(steps)]
    batches = [priv.batch(list(examples), step=g, batch_size=cfg.train.batch_size, public_seed=cfg.seed,
                          pad_id=pad_id) for g in gsteps]
    try:
        priv.train(model, opt, (LossBatch((b.input_ids, b.attention_mask, b.labels)) for b in batches),
                   steps=gsteps, device=device, train_mode=True, dropout_seed=cfg.seed * 1_000_003 + round_)
        update = flat_trainable_of(model) - start
    finally:
        _restore(model, start)
    return RoundUpdate(update, [b for b in batches if len(b)], priv.plan.noise_multiplier if priv.plan else None)
