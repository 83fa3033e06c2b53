"""The server's DP-SGD ledger on the wire: the steps it has requested of a node, in a round's first message.

The server keeps, per node, the DP-SGD steps it asked for
(:class:`~guardedtuning.results.PrivacyLedger`). The first message of each round carries
that count as ``config["dp-ledger-steps"]`` (:func:`with_ledger_steps`); a client takes the
larger of its own step count and this one
(:meth:`~guardedtuning.privacy.client.ClientPrivacy.for_client`), so a client that lost
its state does not start its accounting from zero, and the server can only make the
client's accounting stricter, never looser. Every design's first message may carry it;
a message without it means 0.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from guardedtuning.errors import MessageError
from guardedtuning.wire.records import config_value

LEDGER_STEPS_KEY = "dp-ledger-steps"
MAX_LEDGER_STEPS = 2**31 - 1  # like server-round: far above any plan, far below int64 overflow


def with_ledger_steps(msg: Message, steps: int) -> Message:
    """``msg`` with ``config[dp-ledger-steps] = steps`` (a copy: strategies may share one content)."""
    conf = msg.content.get("config")
    items = dict(conf.items()) if isinstance(conf, ConfigRecord) else {}
    content = RecordDict({**dict(msg.content.items()), "config": ConfigRecord({**items, LEDGER_STEPS_KEY: int(steps)})})
    return Message(content=content, message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)


def ledger_steps_of(msg: Message, *, source: str) -> int:
    """The ledger's DP-SGD steps a message carries (0 when it carries none); >= 0, or a MessageError."""
    conf = msg.content.get("config")
    if not isinstance(conf, ConfigRecord) or LEDGER_STEPS_KEY not in conf:
        return 0
    value = config_value(conf, LEDGER_STEPS_KEY, int, source=source)
    if not 0 <= value <= MAX_LEDGER_STEPS:
        raise MessageError(f"{source}: `{LEDGER_STEPS_KEY}` must be in 0..{MAX_LEDGER_STEPS} but is {value}")
    return value
