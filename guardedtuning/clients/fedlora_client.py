"""The ``fedlora`` client: local LoRA training on the whole model, then the update."""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, Context, Message

from guardedtuning.clients.common import (
    client_batch,
    client_device,
    client_examples,
    metrics_record,
    partition_of,
    round_start_adapter,
    run_config,
    update_content,
)
from guardedtuning.data.sources import load_task
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.parts import client_full_model
from guardedtuning.training import local_train, make_optimizer
from guardedtuning.wire.records import config_value, get_record


def handle_fedlora_train(msg: Message, context: Context) -> Message:
    """Local LoRA training on the whole model; replies with the adapter update."""
    t0, started = time.perf_counter(), time.time()
    cfg = run_config(context)
    source = f"train message to node {context.node_id}"
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = config_value(conf, "server-round", int, source=source)
    device = client_device(cfg)
    task = load_task(cfg.data, cfg.seed)
    model = client_full_model(cfg.model, cfg.split.layer, cfg.lora, task.num_labels, str(device), cfg.seed)
    start = round_start_adapter(msg, context, source=source)
    load_trainable(model, start, source=source)
    opt = make_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    assert opt is not None  # the whole model carries LoRA and the head
    steps = cfg.train.local_steps
    batches = (client_batch(context, cfg, (round_ - 1) * steps + s) for s in range(steps))
    with torch.random.fork_rng(devices=[]):  # dropout draws depend on (seed, client, round) only
        torch.manual_seed(cfg.seed * 1_000_003 + partition_of(context, cfg)[0] * 1_009 + round_)
        losses = local_train(model, opt, batches, device)
    now = trainable_state(model)
    examples = float(steps * min(cfg.train.batch_size, len(client_examples(context, cfg))))
    content, extra = update_content({k: now[k] - start[k] for k in now}, num_examples=examples, context=context)
    content["metrics"] = metrics_record(t0, started, state=context.state, train_loss=sum(losses) / len(losses),
                                        **extra)
    return Message(content, reply_to=msg)
