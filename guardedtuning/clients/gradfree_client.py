"""The ``gradfree`` client: no gradient crosses the cut, no label leaves.

Two ``train.gradfree`` messages per round:

1. ``stage = release`` (the strategy's first message, with the global output adapter and
   head): the client runs its frozen bottom on *all* of its rows (one local epoch, in
   chunks of ``eval.batch-size``), perturbs every token vector with the token mechanism
   (``privacy.mechanism``, through :meth:`ClientPrivacy.release
   <guardedtuning.privacy.client.ClientPrivacy.release>`, so every privacy knob of the split
   recipes applies) and replies with the activations
   and attention mask only: the labels are removed before anything is packed;
2. ``stage = train`` (with the hidden states the server's frozen middle and top returned
   for those rows): the client trains its output adapter and head on them with its own
   labels for ``train.local-steps`` steps (plain AdamW, or DP-SGD with Poisson batches
   under ``dp.enabled``), and replies with the adapter-and-head update (sealed under
   secure aggregation).

Releasing every row each round keeps the server from learning which rows a step sampled
(DP-SGD's amplification by sampling needs that) and makes a round two round trips. Each
row is released once per round, so the token mechanism's guarantee composes over rounds.

State in ``context.state``: the round's starting adapter (``gradfree.start``, dropped at
the end of the round), and, as in ``split``, the client's message sequence (``release``
then ``train`` of one round, rounds increasing: a replayed stage is refused) and DP
accountant. The noise of every release is a fresh draw.
The messages: :mod:`guardedtuning.wire.gradfree`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from flwr.app import Context, Message

from guardedtuning.clients.common import (
    ClientSetup,
    Clock,
    client_privacy,
    client_setup,
    keep_round_state,
    keeping_privacy,
    loss_metrics,
    reply,
    round_start_adapter,
    round_state,
    update_reply,
)
from guardedtuning.config import ModelConfig
from guardedtuning.data.batches import Batch
from guardedtuning.data.sources import load_task
from guardedtuning.errors import MessageError
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.output_adapter import GradfreeHead, build_gradfree_head
from guardedtuning.models.split import Bottom, check_split_layer
from guardedtuning.privacy.client import ClientPrivacy, Released
from guardedtuning.privacy.local_dpsgd import LossBatch
from guardedtuning.training import flat_trainable, forward_activations, load_flat_trainable, make_optimizer
from guardedtuning.wire import gradfree as wire
from guardedtuning.wire.gradfree import GradfreeStage
from guardedtuning.wire.ledger import ledger_steps_of

START_KEY = "gradfree.start"


@functools.lru_cache(maxsize=2)
def gradfree_parts(model: ModelConfig, layer: int, num_labels: int, adapter_dim: int, device: str,
                   seed: int) -> tuple[Bottom, GradfreeHead]:
    """The client's frozen bottom (no adapter) and its output adapter + head, built once per process."""
    with torch.random.fork_rng(devices=[]):
        backbone = load_backbone(model.name, num_layers=model.num_layers, seed=seed)
    check_split_layer(layer, backbone.num_layers, backbone.name)
    bottom = Bottom(backbone, layer).to(torch.device(device)).eval()
    for p in bottom.parameters():
        p.requires_grad_(False)
    head = build_gradfree_head(backbone.kind, backbone.hidden_size, num_labels, adapter_dim, seed=seed,
                               lm_head=backbone.lm_head).to(torch.device(device))
    return bottom, head


def parts_of(setup: ClientSetup) -> tuple[Bottom, GradfreeHead]:
    """:func:`gradfree_parts` for this client's config and device."""
    cfg = setup.cfg
    return gradfree_parts(cfg.model, cfg.split.layer, load_task(cfg.data, cfg.seed).num_labels,
                          cfg.gradfree.adapter_dim, str(setup.device), cfg.seed)


def release_rows(bottom: Bottom, batch: Batch, priv: ClientPrivacy, device: torch.device, *, chunk: int,
                 round_: int) -> Released:
    """Perturbed activations (and mask) of every row of ``batch``, in chunks of ``chunk`` rows; no labels.

    Each chunk goes through :meth:`ClientPrivacy.release` (fresh noise; with a fixed
    ``privacy.noise-seed`` the stream ``(round - 1) x chunks + c``); quantized chunks
    concatenate row-wise, since their scales are per token.
    """
    starts = list(range(0, len(batch), chunk))
    parts = []
    for c, s in enumerate(starts):
        ids, mask = batch.input_ids[s:s + chunk], batch.attention_mask[s:s + chunk]
        sub = Batch(ids, mask, batch.labels[s:s + chunk], batch.class_ids[s:s + chunk])
        h = forward_activations(bottom, sub, device)  # (b, T, D)
        parts.append(priv.release(h, mask, input_ids=ids, step=(round_ - 1) * len(starts) + c))
    merged: Released = {}
    for key, first in parts[0].items():
        if key == "meta":
            merged[key] = first
        elif isinstance(first, torch.Tensor):
            merged[key] = torch.cat([p[key] for p in parts])  # type: ignore[misc]
        else:
            merged[key] = np.concatenate([p[key] for p in parts])  # type: ignore[misc]
    return merged


def train_head(head: GradfreeHead, z: torch.Tensor, batch: Batch, priv: ClientPrivacy, setup: ClientSetup, *,
               round_: int) -> list[float]:
    """``train.local-steps`` steps of the output adapter and head on the returned hidden states (N, T, D)."""
    cfg, device = setup.cfg, setup.device
    opt = make_optimizer(head, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if opt is None:
        raise MessageError("the gradfree head has nothing to train (a decoder needs gradfree.adapter-dim > 0)")
    steps, n = cfg.train.local_steps, len(batch)
    gsteps = [(round_ - 1) * steps + s for s in range(steps)]

    def rows(g: int) -> LossBatch:
        idx = torch.from_numpy(priv.rows(n, step=g, batch_size=cfg.train.batch_size, public_seed=cfg.seed))
        return LossBatch((z[idx].to(device), batch.attention_mask[idx].to(device), batch.labels[idx].to(device)))

    return priv.train(head, opt, (rows(g) for g in gsteps), steps=gsteps, device=device)


def release_stage(setup: ClientSetup, priv: ClientPrivacy, stage: GradfreeStage,
                  start: dict[str, torch.Tensor], *, source: str) -> tuple[Released, dict[str, np.ndarray]]:
    """Stage ``release``: load the global adapter and head, release every row; returns it and the round's start."""
    bottom, head = parts_of(setup)
    load_trainable(head, start, source=source)
    acts = release_rows(bottom, setup.all_rows, priv, setup.device, chunk=setup.cfg.eval.batch_size,
                        round_=stage.round_)
    return acts, {"flat": flat_trainable(head).numpy()}


def train_stage(setup: ClientSetup, priv: ClientPrivacy, stage: GradfreeStage, z: torch.Tensor,
                start: np.ndarray) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Stage ``train``: local steps of the head from the round's ``start`` on ``z``; the update and the losses."""
    _, head = parts_of(setup)
    flat = torch.from_numpy(start)
    load_flat_trainable(head, flat)
    losses = train_head(head, z, setup.all_rows, priv, setup, round_=stage.round_)
    load_flat_trainable(head, flat_trainable(head) - flat)  # the cached head is reloaded by every message
    return trainable_state(head), losses


def handle_gradfree(msg: Message, context: Context) -> Message:
    """Stage ``release`` (activations of every row up) or ``train`` (local head training, update up)."""
    clock, setup, source = Clock(), client_setup(context), f"{wire.MESSAGE_TYPE} message to node {context.node_id}"
    stage = wire.unpack_stage(msg, source=source)
    priv = client_privacy(context, setup, round_=stage.round_, resumed_after=stage.resumed_after,
                          step=0 if stage.stage == wire.RELEASE else 1, source=source, membership_visible=False,
                          ledger_steps=ledger_steps_of(msg, source=source))
    handler = handle_release if stage.stage == wire.RELEASE else handle_train
    return handler(msg, context, setup, priv, stage, clock, source=source)


def handle_release(msg: Message, context: Context, setup: ClientSetup, priv: ClientPrivacy, stage: GradfreeStage,
                   clock: Clock, *, source: str) -> Message:
    """Stage ``release``: the perturbed activations of every row (or a spent budget)."""
    if priv.budget_spent(steps=setup.cfg.train.local_steps):
        return reply(msg, metrics=clock.metrics(**priv.spent_metrics()))
    acts, start = release_stage(setup, priv, stage, round_start_adapter(msg, context, source=source), source=source)
    keep_round_state(context.state, {START_KEY: start}, (START_KEY,))
    metrics = clock.metrics(state=context.state, rows=float(len(setup.examples)))
    return reply(msg, acts=wire.release_record(acts), metrics=metrics)


def handle_train(msg: Message, context: Context, setup: ClientSetup, priv: ClientPrivacy, stage: GradfreeStage,
                 clock: Clock, *, source: str) -> Message:
    """Stage ``train``: local training of the head on the returned hidden states; the update."""
    start = round_state(context.state, (START_KEY,)).get(START_KEY)
    if start is None:
        raise MessageError(f"{source}: stage {wire.TRAIN!r} of round {stage.round_} arrived without stage "
                           f"{wire.RELEASE!r}")
    n, t = setup.all_rows.input_ids.shape
    z = wire.unpack_hidden(msg, expected=(n, t, int(parts_of(setup)[0].word_embeddings().shape[1])), source=source)
    with keeping_privacy(context, priv):
        update, losses = train_stage(setup, priv, stage, z, start["flat"])
    keep_round_state(context.state, {}, (START_KEY,))
    return update_reply(msg, context, update, num_examples=setup.round_examples(), clock=clock, priv=priv,
                        **loss_metrics(losses))
