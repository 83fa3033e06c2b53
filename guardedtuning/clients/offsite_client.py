"""The ``offsite`` client: fine-tune the adapter sandwich on the emulator, locally.

One ``train.offsite`` message per round (the strategy's first message) carries the
global adapters (LoRA on the first and last ``a`` blocks, and the head) and the digest
of the emulator; the client's first one also carries the emulator itself (``emulator``:
its frozen weights by name, :func:`~guardedtuning.models.emulator.frozen_package`). The
client checks the digest, keeps the package on disk (``$GUARDEDTUNING_CACHE/offsite``,
where a deployed client would keep it; in a simulation every Ray worker that serves the
client finds it there), trains ``train.local-steps`` steps (plain AdamW, or DP-SGD with
Poisson batches, the private seed and the persistent accountant of ``split`` under
``dp.enabled``) and replies with the adapter update, sealed under secure aggregation.
Nothing else leaves the client: no activation, no label, no gradient.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from guardedtuning.clients.common import (
    client_batch,
    client_device,
    client_examples,
    metrics_record,
    partition_of,
    resumed_after_of,
    round_start_adapter,
    run_config,
    update_content,
)
from guardedtuning.clients.split_client import ACCOUNTANT_KEY, privacy_of, step_batch
from guardedtuning.data.sources import load_task
from guardedtuning.errors import MessageError
from guardedtuning.models.emulator import client_emulator, package_digest, store_package
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.smollm import cache_root
from guardedtuning.privacy.dpsgd import budget_spent
from guardedtuning.privacy.local_dpsgd import LossBatch, dp_local_train
from guardedtuning.privacy.randomness import STREAM_DP_NOISE, make_generator
from guardedtuning.training import local_train, make_optimizer
from guardedtuning.wire.records import config_value, get_record, record_to_tensors

MESSAGE_TYPE = "train.offsite"
EMULATOR_KEY = "emulator"


def package_root() -> Path:
    """Where a client keeps the emulator it received: ``$GUARDEDTUNING_CACHE`` or ``~/.cache/guardedtuning``."""
    return cache_root()


def receive_package(msg: Message, digest: str, *, source: str) -> None:
    """Check and store the emulator a message carries (if it carries one)."""
    if EMULATOR_KEY not in msg.content:
        return
    record = get_record(msg.content, EMULATOR_KEY, ArrayRecord, source=source, sender="ServerApp")
    package = record_to_tensors(record, source=source, float_only=True)
    got = package_digest(package)
    if got != digest:
        raise MessageError(f"{source}: the emulator has digest {got} but the message names {digest}; "
                           "it was damaged on the way")
    store_package(package, digest, package_root())


def handle_offsite_train(msg: Message, context: Context) -> Message:
    """Local training of the adapters on the emulator; replies with the adapter update."""
    t0, started = time.perf_counter(), time.time()
    cfg = run_config(context)
    source = f"{MESSAGE_TYPE} message to node {context.node_id}"
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = config_value(conf, "server-round", int, source=source)
    digest = config_value(conf, "digest", str, source=source)
    resumed_after = resumed_after_of(conf, source)
    receive_package(msg, digest, source=source)
    pid, _ = partition_of(context, cfg)
    device = client_device(cfg)
    task = load_task(cfg.data, cfg.seed)
    model = client_emulator(cfg.model, cfg.offsite, cfg.lora, task.num_labels, digest, str(package_root()),
                            str(device), cfg.seed)
    priv = privacy_of(context, cfg, round_=round_, resumed_after=resumed_after)
    steps = cfg.train.local_steps
    if priv.plan is not None and priv.accountant is not None and budget_spent(priv.accountant, priv.plan,
                                                                               steps=steps):
        eps = priv.accountant.epsilon(delta=priv.plan.delta)
        return Message(RecordDict({"metrics": metrics_record(
            t0, started, **{"budget-spent": 1.0, "epsilon": eps})}), reply_to=msg)
    start = round_start_adapter(msg, context, source=source)
    load_trainable(model, start, source=source)
    opt = make_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    assert opt is not None  # the adapters always train
    gsteps = [(round_ - 1) * steps + s for s in range(steps)]
    if priv.plan is not None and priv.accountant is not None:
        batches = (step_batch(context, cfg, priv, g) for g in gsteps)  # Poisson, from the private seed
        losses = dp_local_train(
            model, opt, (LossBatch((b.input_ids, b.attention_mask, b.labels)) for b in batches),
            (make_generator(priv.seed, STREAM_DP_NOISE, pid, g) for g in gsteps),
            plan=priv.plan, accountant=priv.accountant, device=device)
        context.state[ACCOUNTANT_KEY] = ArrayRecord({k: Array(v) for k, v in priv.accountant.state_dict().items()})
    else:
        with torch.random.fork_rng(devices=[]):  # dropout draws depend on (seed, client, round) only
            torch.manual_seed(cfg.seed * 1_000_003 + pid * 1_009 + round_)
            losses = local_train(model, opt, (client_batch(context, cfg, g) for g in gsteps), device)
    now = trainable_state(model)
    examples = float(steps * min(cfg.train.batch_size, len(client_examples(context, cfg))))
    content, extra = update_content({k: now[k] - start[k] for k in now}, num_examples=examples, context=context)
    if losses:
        extra["train_loss"] = statistics.fmean(losses)
    if priv.plan is not None and priv.accountant is not None:
        extra["epsilon"] = priv.accountant.epsilon(delta=priv.plan.delta)
    content["metrics"] = metrics_record(t0, started, state=context.state, **extra)
    content["privacy"] = ConfigRecord({k: v for k, v in priv.describe().items() if isinstance(v, (int, float, str))})
    return Message(content, reply_to=msg)
