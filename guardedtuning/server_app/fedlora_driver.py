"""The ``fedlora`` recipe: plain federated LoRA with local training (the FL baseline).

Each round the sampled clients receive the global adapters (LoRA on every block, and
the classification head), train locally for ``train.local-steps`` steps, and return
their updates; the strategy aggregates them. One round trip per round.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.parts import split_model
from guardedtuning.server_app.common import ServerRun
from guardedtuning.server_app.engine import Design, Outcome, Round, run_rounds, train_losses


class FedLoraDesign(Design):
    message_type = MessageType.TRAIN
    what = "global model"

    def __init__(self, run: ServerRun) -> None:
        super().__init__(run)
        cfg = run.cfg
        self.model = split_model(cfg.model, cfg.split.layer, cfg.lora, run.task.num_labels, str(run.device), cfg.seed)
        self.state = trainable_state(self.model)

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def set_global(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        load_trainable(self.model, state, source="global adapter")

    def round_config(self, rnd: Round) -> dict[str, Any]:
        return {"local-steps": self.run.cfg.train.local_steps}

    def train(self, rnd: Round, messages: list[Message]) -> Outcome:
        ex = rnd.exchange(messages, step=False)
        ok, failures, spent = rnd.screen(ex, final=True)
        rnd.give_up_if_nobody(len(ok), failures, spent)
        losses = train_losses(ok)
        rnd.step_event(1, 1, losses, ex, len(ok))
        return Outcome(losses, ex)

    def evaluated_model(self) -> torch.nn.Module:
        return self.model

    def checkpoint(self) -> dict[str, Any]:
        """The global adapters (for a resumed run, and as ``<out>/adapter``, PEFT)."""
        self.run.rec.save_adapter(self.model)
        return {"global": self.state}

    def restore(self, state: dict[str, Any]) -> None:
        self.set_global(state["global"])


def run_fedlora(grid: Grid, run: ServerRun) -> dict[str, float]:
    return run_rounds(grid, run, FedLoraDesign(run))
