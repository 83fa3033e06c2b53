"""The ClientApp: every recipe's handlers, registered from the recipe registry.

Each recipe (:mod:`guardedtuning.recipes`) names the handler of each message type it
sends (``train.split``, ``train``, ``train.gradfree``, ``train.offsite``); a handler is
thin: unpack the message, call plain functions, pack the reply. ``train.secagg``
carries the later stages of secure aggregation (``aggregation.secure``).

Per-client state kept between messages lives in ``context.state``; base weights are
built once per process (:mod:`guardedtuning.models.parts`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from guardedtuning.clients.secagg_handlers import handle_stage_message
from guardedtuning.recipes import message_handlers

app = ClientApp()


def _register(client_app: ClientApp) -> None:
    """Register each message type's handler (``train`` or ``train.<action>``) with ``client_app``."""
    for mtype, handler in message_handlers().items():
        category, _, action = mtype.partition(".")
        if category != "train":
            raise RuntimeError(f"message type {mtype!r}: only train messages are registered")
        client_app.train(action or None)(handler)


_register(app)


@app.train("secagg")
def secagg_stage(msg: Message, context: Context) -> Message:
    """A stage of secure aggregation (share keys, send the masked update, unmask)."""
    return handle_stage_message(msg, context)
