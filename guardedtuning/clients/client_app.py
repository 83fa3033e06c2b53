"""The ClientApp: thin handlers that unpack a message, call plain functions, pack the reply.

Message types:

- ``train.split``: one step of split learning (``split``, ``privtune``), with the client's
  privacy knobs: :mod:`guardedtuning.clients.split_client`;
- ``train``: local LoRA training on the whole model (``fedlora``):
  :mod:`guardedtuning.clients.fedlora_client`;
- ``train.secagg``: the later stages of secure aggregation (``aggregation.secure``):
  :mod:`guardedtuning.clients.secagg_handlers`;
- ``train.gradfree``: the release and local-training stages of ``gradfree``:
  :mod:`guardedtuning.clients.gradfree_client`;
- ``train.offsite``: local (DP-SGD) training of the adapters on the emulator (``offsite``):
  :mod:`guardedtuning.clients.offsite_client`.

Per-client state kept between messages lives in ``context.state``; base weights are
built once per process (:mod:`guardedtuning.models.parts`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from guardedtuning.clients.fedlora_client import handle_fedlora_train
from guardedtuning.clients.gradfree_client import handle_gradfree
from guardedtuning.clients.offsite_client import handle_offsite_train
from guardedtuning.clients.secagg_handlers import handle_stage_message
from guardedtuning.clients.split_client import handle_split_step

app = ClientApp()


@app.train("split")
def split_step(msg: Message, context: Context) -> Message:
    """One merged split step: backward of step s-1, forward of step s."""
    return handle_split_step(msg, context)


@app.train()
def fedlora_train(msg: Message, context: Context) -> Message:
    """Local LoRA training on the whole model."""
    return handle_fedlora_train(msg, context)


@app.train("secagg")
def secagg_stage(msg: Message, context: Context) -> Message:
    """A stage of secure aggregation (share keys, send the masked update, unmask)."""
    return handle_stage_message(msg, context)


@app.train("gradfree")
def gradfree_stage(msg: Message, context: Context) -> Message:
    """Gradfree: release activations (no labels), or train the output adapter and head locally."""
    return handle_gradfree(msg, context)


@app.train("offsite")
def offsite_train(msg: Message, context: Context) -> Message:
    """Offsite tuning: train the adapter sandwich on the emulator, locally."""
    return handle_offsite_train(msg, context)
