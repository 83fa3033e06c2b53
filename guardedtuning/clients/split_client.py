"""The split client: one message per step, with the client-side privacy knobs.

A ``train.split`` message (:mod:`guardedtuning.wire.split`) for step ``s`` does, for this
client (:func:`split_step`):

1. (s > 0) the backward of step ``s - 1``: recompute the bottom on batch ``s - 1`` and
   back-propagate the server's activation gradient, plainly or with DP-SGD
   (``dp.enabled``), plus the NoPeek term (``privacy.nopeek-weight``):
   :meth:`ClientPrivacy.backward <guardedtuning.privacy.client.ClientPrivacy.backward>`;
2. (s < S) the forward of step ``s``: the cut activations of batch ``s``, perturbed by
   the token mechanism (``privacy.mechanism``) and quantized (``privacy.quantize-bits``)
   before they leave (:meth:`~guardedtuning.privacy.client.ClientPrivacy.release_batch`), then
   trimmed to the real tokens' rows (``split.trim-padding``,
   :func:`~guardedtuning.wire.split.acts_record`): both after the noise, post-processing;
   at ``s = S`` the bottom-LoRA update instead.

The server's gradient arrives float32 or quantized (``split.grad-bits``), dense or trimmed,
and is decoded and checked by :func:`~guardedtuning.wire.split.unpack_step`; a trimmed one
is rebuilt on this client's own batch mask (:meth:`~guardedtuning.wire.split.SplitStep.grad_for`).
A malformed gradient is a :class:`~guardedtuning.errors.MessageError` before anything is
computed: the client's error reply drops it from the round, the run goes on.

State in ``context.state``: the round's adapter and optimizer (:data:`ROUND_KEYS`,
dropped when the round ends), and the client's message sequence, the Poisson rows of
the step it released last and its DP accountant (:mod:`guardedtuning.privacy.client`),
which persist across rounds. A message that is not the next step (a replay, a skipped
step, ``steps`` other than ``train.local-steps``) is refused before anything is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    reply,
    round_start_adapter,
    round_state,
    update_reply,
)
from guardedtuning.errors import MessageError
from guardedtuning.models.lora import apply_scope, is_lora_a, load_trainable, trainable_state
from guardedtuning.models.parts import client_bottom
from guardedtuning.privacy.client import ClientPrivacy, Released
from guardedtuning.training import (
    flat_trainable,
    load_flat_trainable,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
)
from guardedtuning.wire import split as wire
from guardedtuning.wire.ledger import ledger_steps_of
from guardedtuning.wire.split import SplitStep

ROUND_KEYS = ("split.lora", "split.start", "split.optim", "split.frozen")

RoundState = dict[str, dict[str, np.ndarray]]


@dataclass
class StepOutcome:
    """What one step gives back: the round state to keep, and the release or (last step) the update."""

    state: RoundState = field(default_factory=dict)
    acts: Released | None = None  # None at the last step
    update: dict[str, torch.Tensor] = field(default_factory=dict)


def split_step(setup: ClientSetup, priv: ClientPrivacy, step: SplitStep, start: dict[str, torch.Tensor] | None,
               state: RoundState, *, source: str) -> StepOutcome:
    """One merged step of this client: the backward of step s-1 (s > 0), then the release of step s (s < S).

    ``start`` is the round's global adapter (step 0 only); ``state`` the round state the
    previous step kept (``split.lora``, ``split.start``, ``split.optim``: flat numpy).
    """
    cfg, device = setup.cfg, setup.device
    bottom = client_bottom(cfg.model, cfg.split, cfg.lora, str(device), cfg.seed)
    apply_scope(bottom, cfg.aggregation.scope)  # lora-b: LoRA's A frozen before the optimizer and Opacus
    base = (step.round_ - 1) * step.steps  # global step of this round's step 0
    if start is not None:
        load_trainable(bottom, start, source=source)
        frozen = frozen_state(bottom)  # lora-b only: steps s > 0 may run in a process that holds another A
        state = {"split.start": {"flat": flat_trainable(bottom).numpy()}, **({"split.frozen": frozen} if frozen else {})}
    else:
        if "split.lora" not in state:
            raise MessageError(f"{source}: step {step.step} of round {step.round_} arrived without step 0 of that "
                               "round (this client holds no round state); a round starts at step 0")
        load_flat_trainable(bottom, torch.from_numpy(state["split.lora"]["flat"]))
        load_frozen(bottom, state.get("split.frozen", {}), source=source)
    opt = make_optimizer(bottom, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    assert opt is not None  # the bottom always carries LoRA
    if step.grad is not None:
        if "split.optim" in state:
            load_optimizer_state(opt, bottom, state["split.optim"])
        g = base + step.step - 1
        batch = setup.batch(priv, g, again=True)
        grad = step.grad_for(batch.attention_mask, dim=bottom.release_dim, source=source)  # padding: zeros
        priv.backward(bottom, opt, batch, grad, device, step=g)
    if step.step < step.steps:
        g = base + step.step
        acts = priv.release_batch(bottom, setup.batch(priv, g), device, step=g)
        return StepOutcome({**state, "split.lora": {"flat": flat_trainable(bottom).numpy()},
                            "split.optim": optimizer_state(opt, bottom)}, acts=acts)
    delta = flat_trainable(bottom) - torch.from_numpy(state["split.start"]["flat"])
    load_flat_trainable(bottom, delta)  # the cached bottom is reloaded by every message
    return StepOutcome(update=trainable_state(bottom))


def frozen_state(bottom: torch.nn.Module) -> dict[str, np.ndarray]:
    """The frozen LoRA A of the round's global adapter (``aggregation.scope=lora-b``), kept for steps s > 0.

    The cached bottom is no record of it: a process that did not run this round's step 0
    (Flower's stock SuperNode starts one per message; a restarted runner; another Ray actor)
    holds the client's own initial A, not the server's.
    """
    return {n: p.detach().cpu().numpy().copy() for n, p in bottom.named_parameters()
            if is_lora_a(n) and not p.requires_grad}


def load_frozen(bottom: torch.nn.Module, frozen: dict[str, np.ndarray], *, source: str) -> None:
    """Copy :func:`frozen_state`'s A back; every frozen A of the bottom must be there."""
    params = {n: p for n, p in bottom.named_parameters() if is_lora_a(n) and not p.requires_grad}
    if set(params) != set(frozen):
        raise MessageError(f"{source}: the round state holds frozen LoRA A for {sorted(frozen)[:2]}, the bottom "
                           f"freezes {sorted(params)[:2]}; a round starts at step 0 with one aggregation.scope")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.from_numpy(frozen[n]).to(p.device, p.dtype))


def handle_split_step(msg: Message, context: Context) -> Message:
    """One merged step: backward of step s-1 (if any), then forward of step s (if any)."""
    clock, setup, source = Clock(), client_setup(context), f"{wire.MESSAGE_TYPE} message to node {context.node_id}"
    step = wire.unpack_step(msg, source=source)
    priv = client_privacy(context, setup, round_=step.round_, resumed_after=step.resumed_after, step=step.step,
                          steps=step.steps, source=source, ledger_steps=ledger_steps_of(msg, source=source))
    if step.step == 0 and priv.budget_spent(steps=step.steps):
        return reply(msg, metrics=clock.metrics(**priv.spent_metrics()))
    start = round_start_adapter(msg, context, source=source) if step.step == 0 else None
    with keeping_privacy(context, priv):
        out = split_step(setup, priv, step, start, round_state(context.state, ROUND_KEYS), source=source)
    keep_round_state(context.state, out.state, ROUND_KEYS)
    if out.acts is not None:
        return reply(msg, acts=wire.acts_record(out.acts, trim=setup.cfg.split.trim_padding), metrics=clock.metrics())
    return update_reply(msg, context, out.update, num_examples=setup.round_examples(step.steps),
                        clock=clock, priv=priv)
