"""The ``fedlora`` client: local LoRA training on the whole model, then the update."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message

from guardedtuning.clients.common import ClientSetup, Clock, client_setup, round_start_adapter, update_reply
from guardedtuning.data.sources import load_task
from guardedtuning.models.lora import apply_scope, load_trainable, trainable_state
from guardedtuning.models.parts import client_full_model
from guardedtuning.training import local_train, make_optimizer
from guardedtuning.wire.records import get_record, round_value

MESSAGE_TYPE = "train"


def fedlora_train(setup: ClientSetup, start: dict[str, torch.Tensor], *, round_: int,
                  source: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``train.local-steps`` plain steps of the whole model's LoRA from ``start``; the update and the losses.

    Dropout draws depend on (seed, client, round) only. Under ``aggregation.scope=lora-b``
    LoRA's A is frozen (:func:`~guardedtuning.models.lora.apply_scope`): the update has no A.
    """
    cfg, device = setup.cfg, setup.device
    model = client_full_model(cfg.model, cfg.split.layer, cfg.lora, load_task(cfg.data, cfg.seed).num_labels,
                              str(device), cfg.seed)
    apply_scope(model, cfg.aggregation.scope)  # the model is cached: set for this run, before the optimizer
    load_trainable(model, start, source=source)
    opt = make_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    assert opt is not None  # the whole model carries LoRA and the head
    steps = cfg.train.local_steps
    batches = (setup.fixed_batch((round_ - 1) * steps + s) for s in range(steps))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1_000_003 + setup.pid * 1_009 + round_)
        losses = local_train(model, opt, batches, device)
    now = trainable_state(model)
    return {k: now[k] - start[k] for k in now}, losses


def handle_fedlora_train(msg: Message, context: Context) -> Message:
    """Local LoRA training on the whole model; replies with the adapter update."""
    clock, setup, source = Clock(), client_setup(context), f"train message to node {context.node_id}"
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = round_value(conf, source=source)
    update, losses = fedlora_train(setup, round_start_adapter(msg, context, source=source), round_=round_,
                                   source=source)
    return update_reply(msg, context, update, num_examples=setup.round_examples(), clock=clock,
                        train_loss=sum(losses) / len(losses))
