"""The ``train.offsite`` message, packed and checked by both sides.

One round trip per round:

- server -> client (``train.offsite``, built by the strategy): ``config``
  (``server-round``, ``digest``: the emulator's :func:`~guardedtuning.models.emulator.package_digest`,
  ``resumed-after``), the global adapters (``arrays``), and on a client's first message the
  emulator itself (:data:`EMULATOR_KEY`: its frozen float tensors by name, added with
  :func:`with_package`);
- client -> server: the adapter ``update`` (+ metrics with ``train_loss``), or ``metrics``
  only (``budget-spent``, ``epsilon``) when the client's privacy budget is spent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from guardedtuning.errors import MessageError
from guardedtuning.models.emulator import package_digest
from guardedtuning.wire.records import config_value, float32_tensors, get_record, round_value
from guardedtuning.wire.split import resumed_after_of

MESSAGE_TYPE = "train.offsite"
DIGEST = re.compile(r"[0-9a-f]{16}")  # what package_digest returns
EMULATOR_KEY = "emulator"


@dataclass(frozen=True)
class OffsiteTrain:
    """What a ``train.offsite`` message asks of a client; ``package`` is the emulator when it carries one."""

    round_: int
    digest: str
    resumed_after: int = 0
    package: dict[str, torch.Tensor] | None = None


def with_package(msg: Message, package: Any) -> Message:
    """The same message with the emulator package added (a copy: strategies may share one content)."""
    content = RecordDict({**dict(msg.content.items()), EMULATOR_KEY: package})
    return Message(content=content, message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)


def unpack_train(msg: Message, *, source: str) -> OffsiteTrain:
    """A ``train.offsite`` message's round and digest, and the emulator it carries (checked against the digest)."""
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = round_value(conf, source=source)
    digest = config_value(conf, "digest", str, source=source)
    if not DIGEST.fullmatch(digest):
        raise MessageError(f"{source}: config key 'digest' is {digest[:40]!r}, expected 16 lowercase hex digits "
                           "(the emulator's package_digest); it names the file the client keeps the emulator in")
    resumed_after = resumed_after_of(conf, source)
    package = None
    if EMULATOR_KEY in msg.content:
        record = get_record(msg.content, EMULATOR_KEY, ArrayRecord, source=source, sender="ServerApp")
        package = float32_tensors(record, source=source, what="emulator tensor")
        got = package_digest(package)
        if got != digest:
            raise MessageError(f"{source}: the emulator has digest {got} but the message names {digest}; "
                               "it was damaged on the way")
    return OffsiteTrain(round_, digest, resumed_after, package)
