"""The ClientApp: every recipe's handlers, registered from the recipe registry.

Each recipe (:mod:`guardedtuning.recipes`) names the handler of each message type it
sends (``train.split``, ``train``, ``train.gradfree``, ``train.offsite``); a handler is
thin: unpack the message, call plain functions, pack the reply. Secure aggregation
(``aggregation.secure``) is the client mod
:data:`~guardedtuning.strategies.secagg.mod.secagg_mod`, installed on the app: it
answers the key and unmask stages itself and seals the final reply of a secure round.

Per-client state kept between messages lives in ``context.state``; base weights are
built once per process (:mod:`guardedtuning.models.parts`).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from guardedtuning.recipes import message_handlers
from guardedtuning.strategies.secagg.mod import secagg_mod

app = ClientApp(mods=[secagg_mod])


def _register(client_app: ClientApp) -> None:
    """Register each message type's handler (``train`` or ``train.<action>``) with ``client_app``."""
    for mtype, handler in message_handlers().items():
        category, _, action = mtype.partition(".")
        if category != "train":
            raise RuntimeError(f"message type {mtype!r}: only train messages are registered")
        (client_app.train(action) if action else client_app.train())(handler)


_register(app)

