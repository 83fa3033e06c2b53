"""Packing tensors into Flower records and back, and measuring what crosses the wire.

Shared by the ClientApp, the ServerApp and the strategies. Unpacking checks what it
gets: a missing record names the key and the component that should have sent it; a
tensor with the wrong dtype, a non-finite value or the wrong shape is a
:class:`~guardedtuning.errors.MessageError`, so a bad reply is rejected, not used.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from guardedtuning.compat import get_all_nested_objects
from guardedtuning.errors import MessageError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors -> ArrayRecord (CPU numpy copies; bfloat16 goes as float32)."""
    out = ArrayRecord()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[name] = Array(np.ascontiguousarray(t.numpy()))
    return out


def record_to_tensors(
    record: ArrayRecord, *, source: str, finite: bool = True, float_only: bool = False
) -> dict[str, torch.Tensor]:
    """ArrayRecord -> named tensors, rejecting non-finite or non-float values."""
    out: dict[str, torch.Tensor] = {}
    for name in record.keys():
        try:
            arr = record[name].numpy()
        except Exception as exc:  # noqa: BLE001 - any undecodable payload is a bad message
            raise MessageError(f"{source}: array {name!r} cannot be decoded ({exc})") from exc
        if float_only and arr.dtype.name not in FLOAT_DTYPES:
            raise MessageError(f"{source}: array {name!r} has dtype {arr.dtype}, expected a float dtype")
        if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise MessageError(f"{source}: array {name!r} holds NaN or inf")
        out[name] = torch.from_numpy(np.array(arr, copy=True))
    return out


def float32_tensors(record: ArrayRecord, *, source: str, what: str) -> dict[str, torch.Tensor]:
    """ArrayRecord -> float32 tensors, checked after the cast (what the receiver computes with).

    Parameters
    ----------
    record : ArrayRecord
        The arrays received.
    source : str
        The message they came in, for the error.
    what : str
        What the arrays are (``"adapter tensor"``, ``"activation gradient"``), for the error.

    Raises
    ------
    MessageError
        When an array cannot be decoded, is not of a float dtype, or is NaN/inf, or becomes
        inf in the cast (a float64 1e300 is finite, its float32 is not), which would turn
        the receiver's weights or activations to NaN.
    """
    out = record_to_tensors(record, source=source, float_only=True)
    for name, t in out.items():
        t32 = t.to(torch.float32)
        if not bool(torch.isfinite(t32).all()):
            raise MessageError(f"{source}: {what} {name!r} is non-finite after the cast to float32 (largest |value| "
                               f"{float(t.double().abs().max()):.3g}); the sender must send float32-finite values")
        out[name] = t32
    return out


def get_record(content: RecordDict, key: str, kind: type, *, source: str, sender: str):  # type: ignore[no-untyped-def]
    """``content[key]`` of the given record type, or a MessageError naming who should send it."""
    if key not in content:
        raise MessageError(f"{source}: record {key!r} is missing; it is sent by the {sender}")
    rec = content[key]
    if not isinstance(rec, kind):
        raise MessageError(f"{source}: record {key!r} is a {type(rec).__name__}, expected {kind.__name__}")
    return rec


def config_value(cfg: ConfigRecord, key: str, typ: type, *, source: str):  # type: ignore[no-untyped-def]
    if key not in cfg:
        raise MessageError(f"{source}: config key {key!r} is missing; the ServerApp sends it")
    value = cfg[key]
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, str):
        return value
    if typ is bool and isinstance(value, bool):
        return value
    raise MessageError(f"{source}: config key {key!r} is {value!r}, expected {typ.__name__}")


MAX_ROUND = 2**31 - 1
"""The largest ``server-round`` a client accepts (global steps and seeds are derived from it)."""


def round_value(cfg: ConfigRecord, *, source: str) -> int:
    """A message's ``server-round``: an int in 1..:data:`MAX_ROUND`, or a MessageError naming it."""
    value = config_value(cfg, "server-round", int, source=source)
    if not 1 <= value <= MAX_ROUND:
        raise MessageError(f"{source}: config key 'server-round' is {value}, expected a round in 1..{MAX_ROUND} "
                           "(rounds count from 1)")
    return value


def metric_value(rec: MetricRecord, key: str, *, source: str) -> float:
    if key not in rec:
        raise MessageError(f"{source}: metric {key!r} is missing; the ClientApp sends it")
    value = rec[key]
    if isinstance(value, list) or isinstance(value, bool) or not np.isfinite(float(value)):
        raise MessageError(f"{source}: metric {key!r} is {value!r}, expected a finite number")
    return float(value)


def message_nbytes(message: Message) -> int:
    """Bytes of the serialised message as Flower ships it (object tree, deduplicated)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def dense_nbytes(record: ArrayRecord) -> int:
    """What the same arrays would take as dense fp32 (the uncompressed reference); 0 for a record of another type.

    A reply's ``update`` may be anything a client sends (the strategy rejects what is not
    an ArrayRecord); counting it must not fail.
    """
    if not isinstance(record, ArrayRecord):
        return 0
    return sum(4 * int(np.prod(record[k].shape)) for k in record.keys())
