"""The ``gradfree`` recipe (GuardedTuning Gradfree): no gradient crosses the cut.

A round, for the sampled clients (two round trips, plus the secure-aggregation stages):

- message 1 (``train.gradfree``, stage ``release``, built by the strategy) carries the
  global output adapter and head; each client answers with the perturbed activations of
  all of its rows and their attention mask, never labels;
- the server runs its frozen middle and top (blocks ``split.layer``..L, and the final
  norm of a decoder) on them, in ``eval.batch-size`` chunks, without autograd;
- message 2 (stage ``train``) carries those output hidden states; each client trains its
  output adapter and head on them with its own labels and answers with the update;
- the strategy aggregates the updates; the server evaluates the assembled model
  (bottom, middle and top, aggregated adapter and head) on the held-out split.

Nothing is trained on the server, and nothing it sends is a gradient. A reply that is an
error, late or malformed (shape, dtype, NaN, or anything besides the activations and the
mask, labels included) drops that client for the rest of the round.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from guardedtuning.errors import ConfigError, MessageError
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.output_adapter import GradfreeModel, build_gradfree_head
from guardedtuning.models.parts import split_model
from guardedtuning.models.split import Top
from guardedtuning.server_app.common import ServerRun
from guardedtuning.server_app.engine import Design, Outcome, Round, run_rounds, train_losses
from guardedtuning.wire.gradfree import MESSAGE_TYPE, RELEASE, train_message, unpack_release


@torch.no_grad()
def middle_outputs(top: Top, h: torch.Tensor, mask: torch.Tensor, device: torch.device, chunk: int) -> torch.Tensor:
    """The frozen middle and top's output hidden states for every released row, (N, T, D) on the CPU."""
    top.eval()
    out = [top.hidden(h[s:s + chunk].to(device), mask[s:s + chunk].to(device)).cpu()
           for s in range(0, h.shape[0], chunk)]
    return torch.cat(out)


class GradfreeDesign(Design):
    """Gradfree's server side: a frozen middle and top, the output adapter and head aggregated."""

    message_type = MESSAGE_TYPE
    what = "global adapter and head"

    def __init__(self, run: ServerRun) -> None:
        super().__init__(run)
        cfg = run.cfg
        model = split_model(cfg.model, cfg.split.layer, cfg.lora, run.task.num_labels, str(run.device), cfg.seed,
                            lora_bottom=False, lora_top=False)
        for p in model.parameters():  # nothing of the provider's model trains
            p.requires_grad_(False)
        self.top = model.top
        self.hidden = int(model.bottom.word_embeddings().shape[1])
        lm_head = model.top.head if model.kind == "decoder" else None
        self.head = build_gradfree_head(model.kind, self.hidden, run.task.num_labels, cfg.gradfree.adapter_dim,
                                        seed=cfg.seed, lm_head=lm_head).to(run.device)
        if not trainable_state(self.head):
            raise ConfigError(f"`gradfree.adapter-dim` is 0 but {cfg.model.name!r} is a decoder, whose head is the "
                              "frozen LM head: nothing would train; pass --set gradfree.adapter-dim=64")
        self.assembled = GradfreeModel(model.bottom, model.top, self.head)
        self.state = trainable_state(self.head)

    @property
    def steps(self) -> int:
        return 2

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def set_global(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        load_trainable(self.head, state, source="global adapter")

    def round_config(self, rnd: Round) -> dict[str, Any]:
        return {"stage": RELEASE, "resumed-after": rnd.resumed_after}

    def dp_steps(self, msg: Message) -> int:
        """The train stage asks for ``train.local-steps`` DP-SGD steps (under ``dp.enabled``); the release none."""
        conf = msg.content.get("config")
        trains = conf is not None and conf.get("stage") not in (None, RELEASE)
        return self.run.cfg.train.local_steps if self.run.cfg.dp.enabled and trains else 0

    def train(self, rnd: Round, messages: list[Message]) -> Outcome:
        """Release, the middle pass, local training."""
        run, cfg = self.run, self.run.cfg
        ex = rnd.exchange(messages)
        ok, failures, spent = rnd.screen(ex, final=False)
        released: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for node, msg in ok.items():
            try:
                released[node] = unpack_release(msg, hidden=self.hidden, max_rows=len(run.task.train),
                                                max_length=cfg.model.max_length)
            except MessageError as exc:
                failures[node] = str(exc)
                rnd.drop(node, str(exc))
        if not released:
            rnd.give_up_if_nobody(0, failures, spent)
            return Outcome([], None)
        rnd.step_event(1, 2, [], ex, len(released))
        t0 = time.perf_counter()
        outs = {n: middle_outputs(self.top, h, mask, run.device, cfg.eval.batch_size)
                for n, (h, mask) in released.items()}
        run.rec.ledger.server_s += time.perf_counter() - t0
        ex = rnd.exchange([train_message(n, rnd.number, z, rnd.resumed_after) for n, z in outs.items()])
        losses = train_losses(ex.ok())
        rnd.step_event(2, 2, losses, ex, len(ex.ok()))
        return Outcome(losses, ex)

    def evaluated_model(self) -> torch.nn.Module:
        return self.assembled

    def checkpoint(self) -> dict[str, Any]:
        """The global output adapter and head (no ``<out>/adapter``: the record's ``adapter`` block says why)."""
        self.run.rec.no_adapter(
            "gradfree trains no weight of the model: its output adapter and head run on the client after the "
            "model's last hidden states (models/output_adapter.py), which the unsplit model has no module for; "
            "the trained tensors are in the checkpoint (global_head)")
        return {"global_head": self.state}

    def restore(self, state: dict[str, Any]) -> None:
        self.set_global(state["global_head"])


def run_gradfree(grid: Grid, run: ServerRun) -> dict[str, float]:
    return run_rounds(grid, run, GradfreeDesign(run))
