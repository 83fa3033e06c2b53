"""The ClientApp: thin handlers that unpack a message, call plain functions, pack the reply.

Message types:

- ``train.split``: one step of split learning (``split`` recipe); see
  :mod:`guardedtuning.clients.steps` for what a step computes;
- ``train``: local LoRA training on the whole model (``fedlora`` recipe).

Per-client state kept between the messages of a round lives in ``context.state``
(``split.lora``, ``split.start``, ``split.optim``) and is dropped when the round's last
message is answered, so memory grows with the clients of a round, not with all clients.
Base weights are built once per process (:mod:`guardedtuning.models.parts`).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from guardedtuning.clients.steps import backward_from_server, forward_activations
from guardedtuning.config import DataConfig, RunConfig, build_config
from guardedtuning.data.batches import Batch, Example, batch_indices, collate, tokenize_rows
from guardedtuning.data.partition import load_partition
from guardedtuning.data.sources import load_task
from guardedtuning.models.loading import kind_of, load_tokenizer
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.parts import client_bottom, client_full_model
from guardedtuning.results import peak_rss_mb
from guardedtuning.strategies.messages import config_value, get_record, record_to_tensors, tensors_to_record
from guardedtuning.training import (
    flat_trainable,
    load_flat_trainable,
    load_optimizer_state,
    local_train,
    make_optimizer,
    optimizer_state,
)

app = ClientApp()

STATE_KEYS = ("split.lora", "split.start", "split.optim")


@functools.lru_cache(maxsize=4)
def _config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return build_config(dict(items))


def run_config(context: Context) -> RunConfig:
    return _config(tuple(sorted(context.run_config.items())))


def client_device(cfg: RunConfig) -> torch.device:
    """The GPU Ray assigned to this actor when the client asked for one, else the CPU."""
    if cfg.sim.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def partition_of(context: Context, cfg: RunConfig) -> tuple[int, int]:
    nc = context.node_config
    if "partition-id" in nc and "num-partitions" in nc:
        return int(nc["partition-id"]), int(nc["num-partitions"])
    raise KeyError(
        "node config lacks partition-id/num-partitions; start each SuperNode with "
        "--node-config 'partition-id=I num-partitions=N'"
    )


@functools.lru_cache(maxsize=128)
def _client_examples(data: DataConfig, seed: int, pid: int, n: int, model: str, max_length: int) -> list[Example]:
    """A client's partition, tokenised once per process (bounded: clients of recent rounds)."""
    task = load_task(data, seed)
    return tokenize_rows(load_partition(data, pid, n, seed), load_tokenizer(model), kind_of(model),
                         max_length=max_length, label_names=task.label_names, instruction=task.instruction)


def client_examples(context: Context, cfg: RunConfig) -> list[Example]:
    pid, n = partition_of(context, cfg)
    return _client_examples(cfg.data, cfg.seed, pid, n, cfg.model.name, cfg.model.max_length)


def client_batch(context: Context, cfg: RunConfig, global_step: int) -> Batch:
    """The batch of this client's ``global_step`` (a pure function of config and step)."""
    examples = client_examples(context, cfg)
    idx = batch_indices(len(examples), cfg.train.batch_size, global_step, seed=cfg.seed,
                        client=partition_of(context, cfg)[0])
    return collate([examples[i] for i in idx], load_tokenizer(cfg.model.name).pad_token_id)


def _bottom(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    return client_bottom(cfg.model, cfg.split.layer, cfg.lora, str(device), cfg.seed)


def _metrics(t0: float, started: float, **extra: float) -> MetricRecord:
    """Compute time and wall-clock interval of this handler (for the overhead figure)."""
    return MetricRecord({"compute_s": time.perf_counter() - t0, "t_start": started, "t_end": time.time(),
                         "peak_mem_mb": peak_rss_mb(), **extra})


@app.train("split")
def split_step(msg: Message, context: Context) -> Message:
    """One merged step: backward of step s-1 (if any), then forward of step s (if any)."""
    t0, started = time.perf_counter(), time.time()
    cfg = run_config(context)
    source = f"train.split message to node {context.node_id}"
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = config_value(conf, "server-round", int, source=source)
    step = config_value(conf, "step", int, source=source)
    steps = config_value(conf, "steps", int, source=source)
    device = client_device(cfg)
    bottom = _bottom(cfg, device)
    state = context.state
    if step == 0:
        start = record_to_tensors(get_record(msg.content, "arrays", ArrayRecord, source=source,
                                             sender="ServerApp"), source=source, float_only=True)
        load_trainable(bottom, start, source=source)
        state["split.start"] = ArrayRecord({"flat": Array(flat_trainable(bottom).numpy())})
    else:
        if "split.lora" not in state:
            raise KeyError(f"{source}: step {step} arrived without step 0 of round {round_}")
        load_flat_trainable(bottom, torch.from_numpy(state["split.lora"]["flat"].numpy()))
    opt = make_optimizer(bottom, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if step > 0:
        if "split.optim" in state:
            load_optimizer_state(opt, bottom, {k: v.numpy() for k, v in state["split.optim"].items()})
        grad = record_to_tensors(get_record(msg.content, "grad", ArrayRecord, source=source,
                                            sender="ServerApp"), source=source, float_only=True)
        base = (round_ - 1) * steps
        backward_from_server(bottom, opt, client_batch(context, cfg, base + step - 1), grad["h"], device)
    content = RecordDict()
    if step < steps:
        batch = client_batch(context, cfg, (round_ - 1) * steps + step)
        h = forward_activations(bottom, batch, device)  # (B, T, D)
        content["acts"] = tensors_to_record({
            "h": h, "mask": batch.attention_mask.to(torch.uint8), "labels": batch.labels})
        state["split.lora"] = ArrayRecord({"flat": Array(flat_trainable(bottom).numpy())})
        state["split.optim"] = ArrayRecord({k: Array(v) for k, v in optimizer_state(opt, bottom).items()})
        content["metrics"] = _metrics(t0, started)
    else:
        delta = flat_trainable(bottom) - torch.from_numpy(state["split.start"]["flat"].numpy())
        load_flat_trainable(bottom, delta)  # the cached bottom is reloaded by every message
        content["update"] = tensors_to_record(trainable_state(bottom))
        for key in STATE_KEYS:
            if key in state:
                del state[key]
        examples = steps * min(cfg.train.batch_size, len(client_examples(context, cfg)))
        content["metrics"] = _metrics(t0, started, **{"num-examples": float(examples)})
    return Message(content, reply_to=msg)


@app.train()
def fedlora_train(msg: Message, context: Context) -> Message:
    """Local LoRA training on the whole model; replies with the adapter update."""
    t0, started = time.perf_counter(), time.time()
    cfg = run_config(context)
    source = f"train message to node {context.node_id}"
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = config_value(conf, "server-round", int, source=source)
    device = client_device(cfg)
    task = load_task(cfg.data, cfg.seed)
    model = client_full_model(cfg.model, cfg.split.layer, cfg.lora, task.num_labels, str(device), cfg.seed)
    start = record_to_tensors(get_record(msg.content, "arrays", ArrayRecord, source=source, sender="ServerApp"),
                              source=source, float_only=True)
    load_trainable(model, start, source=source)
    opt = make_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps = cfg.train.local_steps
    batches = (client_batch(context, cfg, (round_ - 1) * steps + s) for s in range(steps))
    with torch.random.fork_rng(devices=[]):  # dropout draws depend on (seed, client, round) only
        torch.manual_seed(cfg.seed * 1_000_003 + partition_of(context, cfg)[0] * 1_009 + round_)
        losses = local_train(model, opt, batches, device)
    now = trainable_state(model)
    content = RecordDict({
        "update": tensors_to_record({k: now[k] - start[k] for k in now}),
        "metrics": _metrics(t0, started, **{"num-examples": float(steps * min(cfg.train.batch_size, len(client_examples(context, cfg)))),
                                   "train_loss": sum(losses) / len(losses)}),
    })
    return Message(content, reply_to=msg)
