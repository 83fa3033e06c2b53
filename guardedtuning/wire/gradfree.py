"""The ``train.gradfree`` messages, packed and checked by both sides.

Two round trips per round, told apart by the config's ``stage``:

===========  ===============================================  ===========================================
stage        server -> client (``train.gradfree``)            client -> server
===========  ===============================================  ===========================================
``release``  ``config`` (``server-round``, ``stage``,          ``acts``: exactly :data:`RELEASED` (``h``
             ``resumed-after``), the global output adapter     float (N, T, D), ``mask`` uint8 (N, T)) or
             and head (``arrays``, built by the strategy)      :data:`RELEASED_QUANTIZED`; no labels
``train``    ``config``, ``out``: {``z``: float (N, T, D)},    the adapter-and-head ``update`` (+ metrics
             the middle and top's output for those rows        with ``train_loss``)
===========  ===============================================  ===========================================

N is every row of the client (one local epoch). A client whose privacy budget is spent
answers ``release`` with ``metrics`` only (``budget-spent``, ``epsilon``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from guardedtuning.errors import MessageError
from guardedtuning.wire.records import (
    config_value,
    float32_tensors,
    get_record,
    record_to_tensors,
    round_value,
    tensors_to_record,
)
from guardedtuning.wire.split import MAX_SEQUENCE, acts_record, checked_activations, dequantize, resumed_after_of

MESSAGE_TYPE = "train.gradfree"
RELEASE, TRAIN = "release", "train"
ACTS_KEY, OUT_KEY = "acts", "out"
RELEASED = {"h", "mask"}
RELEASED_QUANTIZED = {"codes", "scales", "meta", "mask"}


@dataclass(frozen=True)
class GradfreeStage:
    """What a ``train.gradfree`` message asks of a client."""

    round_: int
    stage: str  # RELEASE or TRAIN
    resumed_after: int = 0


def unpack_stage(msg: Message, *, source: str) -> GradfreeStage:
    """A ``train.gradfree`` message's round and stage, checked."""
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = round_value(conf, source=source)
    stage = config_value(conf, "stage", str, source=source)
    resumed_after = resumed_after_of(conf, source)
    if stage not in (RELEASE, TRAIN):
        raise MessageError(f"{source}: stage is {stage!r}, expected {RELEASE!r} or {TRAIN!r}")
    return GradfreeStage(round_, stage, resumed_after)


def release_record(acts: dict[str, np.ndarray | torch.Tensor]) -> ArrayRecord:
    """A client's release as its record, refused if it holds anything but :data:`RELEASED` (or quantized)."""
    if set(acts) not in (RELEASED, RELEASED_QUANTIZED):
        raise MessageError(f"a gradfree release must hold exactly {sorted(RELEASED)} or "
                           f"{sorted(RELEASED_QUANTIZED)} but holds {sorted(acts)} (labels never leave the client)")
    return acts_record(acts)


def unpack_release(msg: Message, *, hidden: int, max_rows: int,
                   max_length: int = MAX_SEQUENCE) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's released activations and mask, checked; anything else in them is refused.

    Parameters
    ----------
    msg : Message
        The client's ``release`` reply.
    hidden : int
        The hidden size D.
    max_rows : int
        The most rows N a client may release (its partition's size at most).
    max_length : int
        ``model.max-length``: T may not exceed it.

    Returns
    -------
    tuple of torch.Tensor
        ``h`` float32 (N, T, D), finite, each token's norm <= :data:`~guardedtuning.wire.split.MAX_TOKEN_NORM`,
        and ``mask`` long (N, T) of 0/1.

    Raises
    ------
    MessageError
        When the release holds other arrays, or is malformed or out of bounds (the reason names it).
    """
    source = f"reply of node {msg.metadata.src_node_id}"
    record = get_record(msg.content, ACTS_KEY, ArrayRecord, source=source, sender="ClientApp")
    names = set(record.keys())
    if names not in (RELEASED, RELEASED_QUANTIZED):
        raise MessageError(f"{source}: a gradfree release holds {sorted(names)}, expected exactly "
                           f"{sorted(RELEASED)} or {sorted(RELEASED_QUANTIZED)} (labels never leave the client)")
    acts = record_to_tensors(record, source=source)
    h = dequantize(record, source=source) if "codes" in names else acts["h"]
    mask = acts["mask"]
    h = checked_activations(h, source=source, hidden=hidden, max_length=max_length, what="N")
    if not 1 <= h.shape[0] <= max_rows:
        raise MessageError(f"{source}: a release of {h.shape[0]} rows, expected 1 <= N <= {max_rows}")
    if mask.is_floating_point() or mask.is_complex() or tuple(mask.shape) != tuple(h.shape[:2]) or not bool(
            ((mask == 0) | (mask == 1)).all()):
        raise MessageError(f"{source}: attention mask has shape {tuple(mask.shape)} / dtype {mask.dtype}, "
                           f"expected integer {tuple(h.shape[:2])} of 0/1")
    return h, mask.long()


def train_message(node: int, round_: int, z: torch.Tensor, resumed_after: int) -> Message:
    """The ``train`` stage's message to ``node``: the output hidden states ``z`` (N, T, D) of its rows."""
    config = ConfigRecord({"server-round": round_, "stage": TRAIN, "resumed-after": resumed_after})
    return Message(RecordDict({"config": config, OUT_KEY: tensors_to_record({"z": z})}), message_type=MESSAGE_TYPE,
                   dst_node_id=node)


def unpack_hidden(msg: Message, *, expected: tuple[int, int, int], source: str) -> torch.Tensor:
    """The ``train`` stage's hidden states (N, T, D) as float, checked against the rows the client released."""
    out = float32_tensors(get_record(msg.content, OUT_KEY, ArrayRecord, source=source, sender="ServerApp"),
                          source=source, what="hidden state")
    z = out.get("z")
    if z is None or tuple(z.shape) != tuple(expected):
        raise MessageError(f"{source}: returned hidden states have shape {None if z is None else tuple(z.shape)}, "
                           f"expected {tuple(expected)} (one per released token vector)")
    return z.float()
