"""The ``offsite`` client: fine-tune the adapter sandwich on the emulator, locally.

One ``train.offsite`` message per round (:mod:`guardedtuning.wire.offsite`; the
strategy's first message) carries the
global adapters (LoRA on the first and last ``a`` blocks, and the head) and the digest
of the emulator; the client's first one also carries the emulator itself (``emulator``:
its frozen weights by name, :func:`~guardedtuning.models.emulator.frozen_package`). The
client checks the digest, keeps the package on disk (``$GUARDEDTUNING_CACHE/offsite``,
where a deployed client would keep it; in a simulation every Ray worker that serves the
client finds it there), trains ``train.local-steps`` steps (plain AdamW, or DP-SGD with
Poisson batches and DP noise from fresh OS entropy and the persistent accountant of
``split`` under ``dp.enabled``; a replayed or stale round is refused) and replies with the adapter update, sealed under secure aggregation.
Nothing else leaves the client: no activation, no label, no gradient.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, Message

from guardedtuning.clients.common import (
    ClientSetup,
    Clock,
    client_privacy,
    client_setup,
    keeping_privacy,
    loss_metrics,
    reply,
    round_start_adapter,
    update_reply,
)
from guardedtuning.data.sources import load_task
from guardedtuning.models.emulator import client_emulator, store_package
from guardedtuning.models.lora import apply_scope, load_trainable, trainable_state
from guardedtuning.models.smollm import cache_root
from guardedtuning.privacy.client import ClientPrivacy
from guardedtuning.privacy.local_dpsgd import LossBatch
from guardedtuning.training import make_optimizer
from guardedtuning.wire import offsite as wire
from guardedtuning.wire.ledger import ledger_steps_of
from guardedtuning.wire.offsite import OffsiteTrain


def package_root() -> Path:
    """Where a client keeps the emulator it received: ``$GUARDEDTUNING_CACHE`` or ``~/.cache/guardedtuning``."""
    return cache_root()


def offsite_train(setup: ClientSetup, priv: ClientPrivacy, train: OffsiteTrain, start: dict[str, torch.Tensor], *,
                  source: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``train.local-steps`` steps of the adapters on the emulator from ``start``; the update and the losses.

    Plain AdamW in train mode with dropout seeded by (seed, client, round), or DP-SGD on
    Poisson batches and noise from fresh OS entropy (:meth:`ClientPrivacy.train`).
    """
    cfg, device = setup.cfg, setup.device
    model = client_emulator(cfg.model, cfg.offsite, cfg.lora, load_task(cfg.data, cfg.seed).num_labels,
                            train.digest, str(package_root()), str(device), cfg.seed)
    apply_scope(model, cfg.aggregation.scope)  # lora-b: LoRA's A frozen before the optimizer and DP-SGD (cached model)
    load_trainable(model, start, source=source)
    opt = make_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    assert opt is not None  # the adapters always train
    steps = cfg.train.local_steps
    gsteps = [(train.round_ - 1) * steps + s for s in range(steps)]
    batches = (setup.batch(priv, g) for g in gsteps)
    losses = priv.train(model, opt, (LossBatch((b.input_ids, b.attention_mask, b.labels)) for b in batches),
                        steps=gsteps, device=device, train_mode=True,
                        dropout_seed=cfg.seed * 1_000_003 + setup.pid * 1_009 + train.round_)
    now = trainable_state(model)
    return {k: now[k] - start[k] for k in now}, losses


def handle_offsite_train(msg: Message, context: Context) -> Message:
    """Local training of the adapters on the emulator; replies with the adapter update."""
    clock, setup, source = Clock(), client_setup(context), f"{wire.MESSAGE_TYPE} message to node {context.node_id}"
    train = wire.unpack_train(msg, source=source)
    if train.package is not None:  # the client's first round: keep the emulator where later rounds find it
        store_package(train.package, train.digest, package_root())
    priv = client_privacy(context, setup, round_=train.round_, resumed_after=train.resumed_after, source=source,
                          membership_visible=False, ledger_steps=ledger_steps_of(msg, source=source))
    if priv.budget_spent(steps=setup.cfg.train.local_steps):
        return reply(msg, metrics=clock.metrics(**priv.spent_metrics()))
    with keeping_privacy(context, priv):
        update, losses = offsite_train(setup, priv, train, round_start_adapter(msg, context, source=source),
                                       source=source)
    return update_reply(msg, context, update, num_examples=setup.round_examples(), clock=clock, priv=priv,
                        **loss_metrics(losses))
