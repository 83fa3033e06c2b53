"""The ``split`` recipe (GuardedTuning Online): split learning over the Message API.

A round, for the sampled clients C and local steps S (S + 1 round trips):

- message 0 (``train.split``, step 0) carries the global bottom LoRA; each client
  answers with the cut activations of its batch 0;
- message s (1 <= s <= S) carries the gradient for the activations of step s - 1 (only
  the real tokens' rows under ``split.trim-padding``, quantized under ``split.grad-bits``:
  :meth:`SplitDesign._step_message`); the client back-propagates it, steps its optimizer,
  and answers with the activations of step s, or, at s = S, with its bottom-LoRA update;
- between messages the server runs the top once on all clients' activations
  (:func:`guardedtuning.training.top_step`), updating the top and head;
- the updates are aggregated by the strategy and added to the global bottom LoRA; the
  assembled model is evaluated on the held-out split.

A client whose reply is an error, late or malformed is dropped for the rest of the
round (logged and counted); the round goes on with the others. So is a client whose
activations make its loss or gradient on the top non-finite: it is dropped before the
top's optimizer steps, and the step is taken on the others' activations alone.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from guardedtuning.errors import MessageError
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.parts import split_model
from guardedtuning.server_app.common import ServerRun
from guardedtuning.server_app.engine import Design, Outcome, Round, run_rounds
from guardedtuning.training import ClientActs, NonFiniteClients, make_optimizer, top_step
from guardedtuning.wire.split import MESSAGE_TYPE, step_message, unpack_acts


def top_step_nonempty(
    top: torch.nn.Module, opt: torch.optim.Optimizer | None, acts: dict[int, ClientActs], device: torch.device,
) -> tuple[dict[int, torch.Tensor], list[float], dict[int, str]]:
    """:func:`top_step` over the clients that sent rows; an empty batch gets an empty gradient.

    Parameters
    ----------
    top, opt, device
        As :func:`~guardedtuning.training.top_step` takes them.
    acts : dict of int to ClientActs
        Each node's checked activations.

    Returns
    -------
    tuple
        The gradient of each node kept, the mean loss of each non-empty batch kept, and the
        nodes dropped (with the reason) because their loss or gradient on the top was
        non-finite; the top stepped on the kept clients only.
    """
    full = {n: a for n, a in acts.items() if a.h.shape[0] > 0}
    grads: dict[int, torch.Tensor] = {n: torch.zeros_like(a.h) for n, a in acts.items() if n not in full}
    losses: list[float] = []
    dropped: dict[int, str] = {}
    while full:
        try:
            g, losses = top_step(top, opt, list(full.values()), device)
        except NonFiniteClients as exc:  # the top is unchanged: drop them, step on the others
            nodes = list(full)
            for i, reason in exc.reasons.items():
                dropped[nodes[i]] = f"reply of node {nodes[i]}: {reason}; dropped before the top's step"
                del full[nodes[i]]
            continue
        grads.update(zip(full, g, strict=True))
        break
    return grads, losses, dropped


class SplitDesign(Design):
    """Split learning's server side: the top and head train here, the bottom LoRA is aggregated."""

    message_type = MESSAGE_TYPE
    what = "global bottom adapter"

    def __init__(self, run: ServerRun) -> None:
        super().__init__(run)
        cfg, task = run.cfg, run.task
        self.model = split_model(cfg.model, cfg.split, cfg.lora, task.num_labels, str(run.device), cfg.seed,
                                 lora_top=cfg.lora.top)
        self.top_opt = make_optimizer(self.model.top, lr=cfg.train.server_lr, weight_decay=cfg.train.weight_decay)
        self.bottom = trainable_state(self.model.bottom)
        self.hidden = self.model.bottom.release_dim  # what a client releases per token (D, or k)
        self.num_labels = task.num_labels if self.model.kind == "encoder" else int(self.model.top.head.weight.shape[0])
        # Poisson batches (DP-SGD) vary around batch-size; allow a generous bound
        b = cfg.train.batch_size
        self.max_batch = b if not cfg.dp.enabled else 4 * b + 64

    @property
    def steps(self) -> int:
        return self.run.cfg.train.local_steps

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.bottom

    def set_global(self, state: dict[str, torch.Tensor]) -> None:
        self.bottom = state
        load_trainable(self.model.bottom, state, source="global adapter")

    def round_config(self, rnd: Round) -> dict[str, Any]:
        return {"step": 0, "steps": self.steps, "resumed-after": rnd.resumed_after}

    def dp_steps(self, msg: Message) -> int:
        """Message s >= 1 carries the gradient of step s - 1: one DP-SGD step (under ``dp.enabled``)."""
        conf = msg.content.get("config")
        return 1 if self.run.cfg.dp.enabled and conf is not None and conf.get("step", 0) >= 1 else 0

    def evaluated_model(self) -> torch.nn.Module:
        return self.model

    def checkpoint(self) -> dict[str, Any]:
        """The state a resumed run needs; the assembled model's adapters also go out as ``<out>/adapter`` (PEFT)."""
        self.run.rec.save_adapter(self.model)
        return {"global_bottom": self.bottom, "top": trainable_state(self.model.top),
                "top_opt": self.top_opt.state_dict() if self.top_opt is not None else None}

    def restore(self, state: dict[str, Any]) -> None:
        self.set_global(state["global_bottom"])
        load_trainable(self.model.top, state["top"], source="checkpoint")
        if self.top_opt is not None:
            self.top_opt.load_state_dict(state["top_opt"])

    def train(self, rnd: Round, messages: list[Message]) -> Outcome:
        """The S + 1 exchanges of a round: each reply's activations through the top, gradients back."""
        steps, run = self.steps, self.run
        ex = rnd.exchange(messages)
        losses: list[float] = []
        for step in range(1, steps + 1):
            ok, failures, spent = rnd.screen(ex, final=False)
            acts = self._unpack(rnd, ok, failures)
            if not acts:
                if step == 1:
                    rnd.give_up_if_nobody(0, failures, spent)
                return Outcome(losses, None)
            t0 = time.perf_counter()
            grads, client_losses, poisoned = top_step_nonempty(self.model.top, self.top_opt, acts, run.device)
            run.rec.ledger.server_s += time.perf_counter() - t0
            for node, reason in poisoned.items():
                rnd.drop(node, reason)
                del acts[node]
            if not acts:
                return Outcome(losses, None)
            if client_losses:
                losses.append(statistics.fmean(client_losses))
            rnd.step_event(step, steps, losses[-1:], ex, len(acts))
            ex = rnd.exchange([self._step_message(rnd, n, step, grads[n], acts[n]) for n in acts], step=step < steps)
        return Outcome(losses, ex)

    def _step_message(self, rnd: Round, node: int, step: int, grad: torch.Tensor, acts: ClientActs) -> Message:
        """Step ``step``'s message to ``node``: its gradient trimmed to its real tokens and quantized as configured.

        ``split.trim-padding`` sends the rows at the client's mask only; ``split.grad-bits``
        8 or 4 quantizes them per token, with ``split.stochastic-rounding`` from a generator
        of (seed, round, step, node): the server's own randomness, reproducible.
        """
        sc = self.run.cfg.split
        gen = None
        if sc.grad_bits and sc.stochastic_rounding:
            seq = np.random.SeedSequence([self.run.cfg.seed, rnd.number, step, node % 2**64])
            gen = torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0]))
        return step_message(node, rnd.number, step, self.steps, grad, rnd.resumed_after,
                            mask=acts.attention_mask if sc.trim_padding else None, bits=sc.grad_bits, generator=gen)

    def _unpack(self, rnd: Round, ok: dict[int, Message], failures: dict[int, str]) -> dict[int, ClientActs]:
        acts: dict[int, ClientActs] = {}
        for node, msg in ok.items():
            try:
                acts[node] = unpack_acts(msg, hidden=self.hidden, max_batch=self.max_batch,
                                         num_labels=self.num_labels, kind=self.model.kind,
                                         max_length=self.run.cfg.model.max_length)
            except MessageError as exc:
                failures[node] = str(exc)
                rnd.drop(node, str(exc))
        return acts


def run_split(grid: Grid, run: ServerRun) -> dict[str, float]:
    return run_rounds(grid, run, SplitDesign(run))
