"""The ``gradfree`` client: no gradient crosses the cut, no label leaves.

Two ``train.gradfree`` messages per round:

1. ``stage = release`` (the strategy's first message, with the global output adapter and
   head): the client runs its frozen bottom on *all* of its rows (one local epoch, in
   chunks of ``eval.batch-size``), perturbs every token vector with the token mechanism
   (``privacy.mechanism``, through :func:`~guardedtuning.clients.split_client.release`,
   so every privacy knob of the split recipes applies) and replies with the activations
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
the end of the round), and, as in ``split``, the client's private seed and DP accountant.
"""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from guardedtuning.clients.common import (
    client_device,
    client_examples,
    metrics_record,
    partition_of,
    resumed_after_of,
    round_start_adapter,
    run_config,
    update_content,
)
from guardedtuning.clients.split_client import ACCOUNTANT_KEY, Privacy, privacy_of, release, tensors_to_record_mixed
from guardedtuning.config import ModelConfig
from guardedtuning.data.batches import Batch, batch_indices, collate
from guardedtuning.data.sources import load_task
from guardedtuning.errors import MessageError
from guardedtuning.models.loading import load_backbone, load_tokenizer
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.output_adapter import GradfreeHead, build_gradfree_head
from guardedtuning.models.split import Bottom, check_split_layer
from guardedtuning.privacy.dpsgd import budget_spent, poisson_batch_indices
from guardedtuning.privacy.local_dpsgd import LossBatch, dp_local_train
from guardedtuning.privacy.randomness import STREAM_DP_NOISE, make_generator
from guardedtuning.training import flat_trainable, load_flat_trainable, make_optimizer
from guardedtuning.wire.records import config_value, get_record, record_to_tensors

MESSAGE_TYPE = "train.gradfree"
START_KEY = "gradfree.start"
RELEASE, TRAIN = "release", "train"


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


def release_rows(bottom: Bottom, batch: Batch, priv: Privacy, cfg, device: torch.device, *,  # type: ignore[no-untyped-def]
                 pid: int, round_: int) -> dict[str, np.ndarray | torch.Tensor]:
    """Perturbed activations (and mask) of every row of ``batch``, in chunks; no labels.

    Each chunk goes through :func:`~guardedtuning.clients.split_client.release` (noise
    stream ``(round - 1) * chunks + c``); quantized chunks concatenate row-wise, since
    their scales are per token.
    """
    size = cfg.eval.batch_size
    starts = list(range(0, len(batch), size))
    parts = []
    for c, s in enumerate(starts):
        sub = Batch(batch.input_ids[s:s + size], batch.attention_mask[s:s + size], batch.labels[s:s + size],
                    batch.class_ids[s:s + size])
        out = release(bottom, sub, priv, cfg, device, pid=pid, global_step=(round_ - 1) * len(starts) + c)
        del out["labels"]  # labels never leave the client in gradfree
        parts.append(out)
    merged: dict[str, np.ndarray | torch.Tensor] = {}
    for key, first in parts[0].items():
        if key == "meta":
            merged[key] = first
        elif isinstance(first, torch.Tensor):
            merged[key] = torch.cat([p[key] for p in parts])  # type: ignore[misc]
        else:
            merged[key] = np.concatenate([p[key] for p in parts])  # type: ignore[misc]
    return merged


def step_rows(cfg, priv: Privacy, n: int, pid: int, global_step: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Rows of one local step: fixed-size shuffled batches, or Poisson-sampled under DP-SGD."""
    if priv.plan is not None:
        return poisson_batch_indices(n, sample_rate=priv.plan.sample_rate, step=global_step, seed=priv.seed,
                                     client=pid)
    return batch_indices(n, cfg.train.batch_size, global_step, seed=cfg.seed, client=pid)


def train_head(head: GradfreeHead, z: torch.Tensor, batch: Batch, priv: Privacy, cfg, device: torch.device,  # type: ignore[no-untyped-def]
               *, pid: int, round_: int) -> list[float]:
    """``train.local-steps`` steps of the output adapter and head on the returned hidden states (N, T, D)."""
    opt = make_optimizer(head, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if opt is None:
        raise MessageError("the gradfree head has nothing to train (a decoder needs gradfree.adapter-dim > 0)")
    steps, n = cfg.train.local_steps, len(batch)
    gsteps = [(round_ - 1) * steps + s for s in range(steps)]

    def rows(g: int) -> LossBatch:
        idx = torch.from_numpy(step_rows(cfg, priv, n, pid, g))
        return LossBatch((z[idx].to(device), batch.attention_mask[idx].to(device), batch.labels[idx].to(device)))

    if priv.plan is not None and priv.accountant is not None:
        return dp_local_train(head, opt, (rows(g) for g in gsteps),
                              (make_generator(priv.seed, STREAM_DP_NOISE, pid, g) for g in gsteps),
                              plan=priv.plan, accountant=priv.accountant, device=device)
    losses = []
    for g in gsteps:
        opt.zero_grad(set_to_none=True)
        loss = head.per_example_loss(*rows(g).inputs).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def handle_gradfree(msg: Message, context: Context) -> Message:
    """Stage ``release`` (activations of every row up) or ``train`` (local head training, update up)."""
    t0, started = time.perf_counter(), time.time()
    cfg = run_config(context)
    source = f"{MESSAGE_TYPE} message to node {context.node_id}"
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = config_value(conf, "server-round", int, source=source)
    stage = config_value(conf, "stage", str, source=source)
    resumed_after = resumed_after_of(conf, source)
    if stage not in (RELEASE, TRAIN):
        raise MessageError(f"{source}: stage is {stage!r}, expected {RELEASE!r} or {TRAIN!r}")
    pid, _ = partition_of(context, cfg)
    device = client_device(cfg)
    task = load_task(cfg.data, cfg.seed)
    bottom, head = gradfree_parts(cfg.model, cfg.split.layer, task.num_labels, cfg.gradfree.adapter_dim,
                                  str(device), cfg.seed)
    priv = privacy_of(context, cfg, round_=round_, resumed_after=resumed_after)
    batch = collate(list(client_examples(context, cfg)), load_tokenizer(cfg.model.name).pad_token_id)  # (N, T)
    state = context.state
    if stage == RELEASE:
        if priv.plan is not None and priv.accountant is not None and budget_spent(
                priv.accountant, priv.plan, steps=cfg.train.local_steps):
            eps = priv.accountant.epsilon(delta=priv.plan.delta)
            return Message(RecordDict({"metrics": metrics_record(
                t0, started, **{"budget-spent": 1.0, "epsilon": eps})}), reply_to=msg)
        load_trainable(head, round_start_adapter(msg, context, source=source), source=source)
        state[START_KEY] = ArrayRecord({"flat": Array(flat_trainable(head).numpy())})
        acts = release_rows(bottom, batch, priv, cfg, device, pid=pid, round_=round_)
        content = RecordDict({"acts": tensors_to_record_mixed(acts),
                              "metrics": metrics_record(t0, started, state=state, rows=float(len(batch)))})
        return Message(content, reply_to=msg)
    if START_KEY not in state:
        raise MessageError(f"{source}: stage {TRAIN!r} of round {round_} arrived without stage {RELEASE!r}")
    out = record_to_tensors(get_record(msg.content, "out", ArrayRecord, source=source, sender="ServerApp"),
                            source=source, float_only=True)
    z = out.get("z")
    expected = (*batch.input_ids.shape, int(bottom.word_embeddings().shape[1]))
    if z is None or tuple(z.shape) != expected:
        raise MessageError(f"{source}: returned hidden states have shape {None if z is None else tuple(z.shape)}, "
                           f"expected {expected} (one per released token vector)")
    start = torch.from_numpy(state[START_KEY]["flat"].numpy())
    load_flat_trainable(head, start)
    losses = train_head(head, z.float(), batch, priv, cfg, device, pid=pid, round_=round_)
    if priv.accountant is not None:
        state[ACCOUNTANT_KEY] = ArrayRecord({k: Array(v) for k, v in priv.accountant.state_dict().items()})
    delta = flat_trainable(head) - start
    load_flat_trainable(head, delta)  # the cached head is reloaded by every message
    update = trainable_state(head)
    del state[START_KEY]
    examples = float(cfg.train.local_steps * min(cfg.train.batch_size, len(batch)))
    content, extra = update_content(update, num_examples=examples, context=context)
    if losses:
        extra["train_loss"] = statistics.fmean(losses)
    if priv.plan is not None and priv.accountant is not None:
        extra["epsilon"] = priv.accountant.epsilon(delta=priv.plan.delta)
    content["metrics"] = metrics_record(t0, started, state=state, **extra)
    content["privacy"] = ConfigRecord({k: v for k, v in priv.describe().items() if isinstance(v, (int, float, str))})
    return Message(content, reply_to=msg)
