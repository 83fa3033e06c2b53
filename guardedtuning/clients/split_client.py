"""The split client: one message per step, with the client-side privacy knobs.

A ``train.split`` message for step ``s`` does, for this client:

1. (s > 0) the backward of step ``s - 1``: recompute the bottom on batch ``s - 1`` and
   back-propagate the server's activation gradient, plainly or with DP-SGD
   (``dp.enabled``), plus the NoPeek term (``privacy.nopeek-weight``);
2. (s < S) the forward of step ``s``: the cut activations of batch ``s``, perturbed by
   the token mechanism (``privacy.mechanism``) and quantized (``privacy.quantize-bits``)
   before they leave; at ``s = S`` the bottom-LoRA update instead.

State in ``context.state``: the round's adapter and optimizer (``split.*``, dropped when
the round ends), the client's private seed (``privacy.seed``, drawn once from the OS
unless ``privacy.noise-seed`` fixes it) and the DP accountant (``dp.accountant``), which
persist across rounds. Everything random that a guarantee rests on (token noise, DP noise,
Poisson sampling) derives from the private seed, never from the run's public ``seed``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from guardedtuning.clients.common import (
    client_device,
    client_examples,
    examples_of,
    metrics_record,
    partition_of,
    resumed_after_of,
    round_start_adapter,
    run_config,
    update_content,
)
from guardedtuning.clients.steps import backward_from_server, forward_activations
from guardedtuning.config import DPConfig, PrivacyConfig, RunConfig
from guardedtuning.data.batches import Batch, batch_indices, collate
from guardedtuning.data.sources import load_task
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.parts import client_bottom
from guardedtuning.privacy.dchi import clip_tokens
from guardedtuning.privacy.decorrelation import decorrelation_loss
from guardedtuning.privacy.dpsgd import DPAccountant, DPPlan, DPStep, budget_spent, poisson_batch_indices
from guardedtuning.privacy.mechanisms import TokenMechanism, mechanism_from_config
from guardedtuning.privacy.privtune import privtune_base, privtune_from_config
from guardedtuning.privacy.quantize import quantize_activations
from guardedtuning.privacy.randomness import (
    STREAM_DP_NOISE,
    STREAM_TOKEN_NOISE,
    derive_seed,
    make_generator,
    private_seed,
)
from guardedtuning.training import (
    flat_trainable,
    load_flat_trainable,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
)
from guardedtuning.wire.records import config_value, get_record, record_to_tensors, tensors_to_record

ROUND_KEYS = ("split.lora", "split.start", "split.optim")
SEED_KEY = "privacy.seed"
ACCOUNTANT_KEY = "dp.accountant"


@dataclass
class Privacy:
    """This client's privacy setup for one message."""

    seed: int
    mechanism: TokenMechanism
    plan: DPPlan | None
    accountant: DPAccountant | None

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in self.mechanism.describe().items() if v is not None}
        if self.plan is not None and self.accountant is not None:
            out.update(dp_noise_multiplier=self.plan.noise_multiplier, dp_sample_rate=self.plan.sample_rate,
                       dp_epsilon=self.accountant.epsilon(delta=self.plan.delta), dp_delta=self.plan.delta,
                       dp_steps=self.accountant.steps)
        return out


def private_client_seed(context: Context, cfg: RunConfig, pid: int) -> int:
    """The client's seed for everything a guarantee rests on (kept in its own state)."""
    if cfg.privacy.noise_seed >= 0:  # reproducible, and known to whoever knows the config
        return derive_seed(cfg.privacy.noise_seed, pid)
    if SEED_KEY not in context.state:
        context.state[SEED_KEY] = ConfigRecord({"seed": private_seed()})
    return int(context.state[SEED_KEY]["seed"])


@functools.lru_cache(maxsize=64)
def _mechanism(cfg: RunConfig, pid: int, n: int) -> TokenMechanism:
    """The token mechanism of client ``pid`` (PrivTune's tables come from its own data)."""
    p: PrivacyConfig = cfg.privacy
    if p.mechanism != "privtune":
        return mechanism_from_config(p)
    tok = load_tokenizer(cfg.model.name)
    examples = examples_of(cfg.data, cfg.seed, pid, n, cfg.model.name, cfg.model.max_length)
    batch = collate(list(examples), tok.pad_token_id)
    embeddings, scale = privtune_base(cfg.model, cfg.split.layer, cfg.seed)
    mech, _ = privtune_from_config(
        p, embeddings=embeddings, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        labels=batch.class_ids, num_classes=load_task(cfg.data, cfg.seed).num_labels,
        scale=scale, ignore_ids=tuple(tok.all_special_ids),
    )
    return mech



@functools.lru_cache(maxsize=64)
def _plan(dp: DPConfig, num_examples: int, batch_size: int, rounds: int, local_steps: int) -> DPPlan:
    return DPPlan.from_config(dp, num_examples=num_examples, batch_size=batch_size, rounds=rounds,
                              local_steps=local_steps)


def privacy_of(context: Context, cfg: RunConfig, *, round_: int = 1, resumed_after: int = 0) -> Privacy:
    """This client's privacy setup; ``resumed_after`` > 0 says the run restarted after that round.

    The accountant persists in ``context.state``, which a restarted run does not have. A
    client without one in a resumed run charges itself, before anything else, the steps
    of every round it could have taken part in before the restart (``min(resumed_after,
    round - 1) x local steps`` at its planned noise and rate): an upper bound on what it
    spent, and the same schedule the noise was planned for, so the target still holds.
    """
    pid, n = partition_of(context, cfg)
    examples = client_examples(context, cfg)
    plan = accountant = None
    if cfg.dp.enabled:
        plan = _plan(cfg.dp, len(examples), cfg.train.batch_size, cfg.federation.rounds, cfg.train.local_steps)
        accountant = DPAccountant(kind=cfg.dp.accountant)
        if ACCOUNTANT_KEY in context.state:
            accountant.load_state_dict({k: v.numpy() for k, v in context.state[ACCOUNTANT_KEY].items()})
        elif resumed_after > 0:
            earlier = min(resumed_after, round_ - 1) * cfg.train.local_steps
            if earlier > 0:
                accountant.record(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                  steps=earlier)
                context.state[ACCOUNTANT_KEY] = ArrayRecord(
                    {k: Array(v) for k, v in accountant.state_dict().items()})
    mechanism = _mechanism(cfg, pid, n)
    needs_seed = cfg.privacy.mechanism != "none" or plan is not None
    return Privacy(private_client_seed(context, cfg, pid) if needs_seed else 0, mechanism, plan, accountant)


def step_batch(context: Context, cfg: RunConfig, priv: Privacy, global_step: int) -> Batch:
    """The batch of a step: fixed-size shuffled batches, or Poisson-sampled under DP-SGD."""
    pid, _ = partition_of(context, cfg)
    examples = client_examples(context, cfg)
    if priv.plan is not None:
        idx = poisson_batch_indices(len(examples), sample_rate=priv.plan.sample_rate, step=global_step,
                                    seed=priv.seed, client=pid)
    else:
        idx = batch_indices(len(examples), cfg.train.batch_size, global_step, seed=cfg.seed, client=pid)
    return collate([examples[i] for i in idx], load_tokenizer(cfg.model.name).pad_token_id) if len(idx) else \
        _empty_batch()


def _empty_batch() -> Batch:
    empty = torch.zeros((0, 1), dtype=torch.long)
    return Batch(empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def release(bottom: torch.nn.Module, batch: Batch, priv: Privacy, cfg: RunConfig, device: torch.device,
            *, pid: int, global_step: int) -> dict[str, np.ndarray | torch.Tensor]:
    """What leaves the client for one batch: perturbed (and maybe quantized) activations."""
    if len(batch) == 0:
        hidden = int(bottom.word_embeddings().shape[1])
        return {"h": torch.zeros((0, 1, hidden)), "mask": batch.attention_mask.to(torch.uint8),
                "labels": batch.labels}
    h = forward_activations(bottom, batch, device)  # (B, T, D)
    gen = make_generator(priv.seed, STREAM_TOKEN_NOISE, pid, global_step)
    h = priv.mechanism.perturb(h, batch.attention_mask, generator=gen, input_ids=batch.input_ids)
    out: dict[str, np.ndarray | torch.Tensor] = {"mask": batch.attention_mask.to(torch.uint8), "labels": batch.labels}
    if cfg.privacy.quantize_bits:
        out.update(quantize_activations(h, bits=cfg.privacy.quantize_bits).arrays())
    else:
        out["h"] = h
    return out


def backward(bottom: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, grad_h: torch.Tensor,
             priv: Privacy, cfg: RunConfig, device: torch.device, *, pid: int, global_step: int) -> None:
    """Recompute the bottom on ``batch`` and apply the server's gradient (plain or DP-SGD)."""
    weight = cfg.privacy.nopeek_weight
    extra = None
    if weight > 0:
        def extra(h: torch.Tensor, b: Batch = batch) -> torch.Tensor:
            ids = b.input_ids.to(device)
            with torch.no_grad():
                x = bottom.embed(ids)
            return weight * decorrelation_loss(x, h, b.attention_mask.to(device), level=cfg.privacy.nopeek_level)
    # the released value is clip(h) + noise: the server's gradient is for clip(h), so the
    # recomputation applies the same clip (exact), not a straight-through estimate
    clip = cfg.privacy.clip if cfg.privacy.mechanism != "none" and cfg.privacy.clip > 0 else 0.0

    def transform(h: torch.Tensor) -> torch.Tensor:
        return clip_tokens(h, clip=clip) if clip else h

    if priv.plan is not None and priv.accountant is not None:
        dp = DPStep(bottom, priv.plan)
        try:
            dp.step(opt, batch, grad_h, generator=make_generator(priv.seed, STREAM_DP_NOISE, pid, global_step),
                    accountant=priv.accountant, device=device, extra_loss=extra, transform=transform)
        finally:
            dp.close()
        return
    backward_from_server(bottom, opt, batch, grad_h, device, transform=transform, extra_loss=extra)


def handle_split_step(msg: Message, context: Context) -> Message:
    """One merged step: backward of step s-1 (if any), then forward of step s (if any)."""
    t0, started = time.perf_counter(), time.time()
    cfg = run_config(context)
    source = f"train.split message to node {context.node_id}"
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = config_value(conf, "server-round", int, source=source)
    step = config_value(conf, "step", int, source=source)
    steps = config_value(conf, "steps", int, source=source)
    pid, _ = partition_of(context, cfg)
    device = client_device(cfg)
    bottom = client_bottom(cfg.model, cfg.split.layer, cfg.lora, str(device), cfg.seed)
    resumed_after = resumed_after_of(conf, source)
    priv = privacy_of(context, cfg, round_=round_, resumed_after=resumed_after)
    state = context.state
    base = (round_ - 1) * steps
    if step == 0:
        if priv.plan is not None and priv.accountant is not None and budget_spent(priv.accountant, priv.plan,
                                                                                   steps=steps):
            eps = priv.accountant.epsilon(delta=priv.plan.delta)
            return Message(RecordDict({"metrics": metrics_record(
                t0, started, **{"budget-spent": 1.0, "epsilon": eps})}), reply_to=msg)
        load_trainable(bottom, round_start_adapter(msg, context, source=source), source=source)
        state["split.start"] = ArrayRecord({"flat": Array(flat_trainable(bottom).numpy())})
    else:
        if "split.lora" not in state:
            raise KeyError(f"{source}: step {step} arrived without step 0 of round {round_}")
        load_flat_trainable(bottom, torch.from_numpy(state["split.lora"]["flat"].numpy()))
    opt = make_optimizer(bottom, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    assert opt is not None  # the bottom always carries LoRA
    if step > 0:
        if "split.optim" in state:
            load_optimizer_state(opt, bottom, {k: v.numpy() for k, v in state["split.optim"].items()})
        grad = record_to_tensors(get_record(msg.content, "grad", ArrayRecord, source=source,
                                            sender="ServerApp"), source=source, float_only=True)
        backward(bottom, opt, step_batch(context, cfg, priv, base + step - 1), grad["h"], priv, cfg, device,
                 pid=pid, global_step=base + step - 1)
        if priv.accountant is not None:
            state[ACCOUNTANT_KEY] = ArrayRecord({k: Array(v) for k, v in priv.accountant.state_dict().items()})
    content = RecordDict()
    if step < steps:
        batch = step_batch(context, cfg, priv, base + step)
        content["acts"] = tensors_to_record_mixed(release(bottom, batch, priv, cfg, device, pid=pid,
                                                          global_step=base + step))
        state["split.lora"] = ArrayRecord({"flat": Array(flat_trainable(bottom).numpy())})
        state["split.optim"] = ArrayRecord({k: Array(v) for k, v in optimizer_state(opt, bottom).items()})
        content["metrics"] = metrics_record(t0, started)
        return Message(content, reply_to=msg)
    delta = flat_trainable(bottom) - torch.from_numpy(state["split.start"]["flat"].numpy())
    load_flat_trainable(bottom, delta)  # the cached bottom is reloaded by every message
    for key in ROUND_KEYS:
        if key in state:
            del state[key]
    examples = float(steps * min(cfg.train.batch_size, len(client_examples(context, cfg))))
    content, extra = update_content(trainable_state(bottom), num_examples=examples, context=context)
    if priv.plan is not None and priv.accountant is not None:
        extra["epsilon"] = priv.accountant.epsilon(delta=priv.plan.delta)
    content["metrics"] = metrics_record(t0, started, state=context.state, **extra)
    content["privacy"] = ConfigRecord({k: v for k, v in priv.describe().items() if isinstance(v, (int, float, str))})
    return Message(content, reply_to=msg)


def tensors_to_record_mixed(arrays: dict[str, np.ndarray | torch.Tensor]) -> ArrayRecord:
    """Tensors and numpy arrays (quantized codes keep their integer dtype) into one record."""
    out = tensors_to_record({k: v for k, v in arrays.items() if isinstance(v, torch.Tensor)})
    for k, v in arrays.items():
        if isinstance(v, np.ndarray):
            out[k] = Array(np.ascontiguousarray(v))
    return out

