"""The stage payloads of the protocol and their Flower records, checked on the way in.

One round (the server's key stages run in ``configure_train``, before training):

==================  ================================  =====================================
stage               server -> client                  client -> server
==================  ================================  =====================================
``advertise``       :class:`AdvertiseRequest`, with   :class:`Advertise` (signed round keys
                    the :class:`RoundParams` records  and the identity key)
``share-keys``      :class:`KeysRequest` (neighbours' :class:`SharesReply`
                    signed keys)
``collect-masked``  :class:`MaskRequest` (in the      :class:`MaskedReply` (in the sealed
                    round's first training message)   final training reply)
``consistency``     :class:`ConsistencyRequest` (the  :class:`ConsistencyReply` (its
                    survivor set)                     signature of that set)
``unmask``          :class:`UnmaskRequest` (with the  :class:`UnmaskReply`
                    survivors' signatures)
==================  ================================  =====================================

A payload travels as one ConfigRecord (``secagg-stage``: the stage name, the round and
the fields) and, for the masked vector, one ArrayRecord (``secagg-masked``) whose array
``y`` holds the packed words as raw little-endian bytes (``stype`` :data:`RAW_STYPE`):
numpy's file format would add a 128-byte header to every sealed reply (issue 13: 2.3 % of
``guarded``'s whole compressed upload). Decoding checks every key, type, byte length,
list alignment, duplicate id, the stage name and the round, and for the masked vector
its ``stype``, dtype kind, shape and byte length; a :class:`~guardedtuning.errors.MessageError`
names the first problem.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from guardedtuning.errors import MessageError
from guardedtuning.strategies.secagg.keys import COMMIT_BYTES, KEY_BYTES, SIG_BYTES, TAG_BYTES
from guardedtuning.strategies.secagg.shamir import SHARE_BYTES

STAGE_KEY = "secagg-stage"
MASKED_KEY = "secagg-masked"
RAW_STYPE = "raw"
"""``Array.stype`` of the masked vector: ``data`` is the packed words' bytes, nothing else."""
RAW_KINDS = "uif"
"""numpy dtype kinds a raw array may carry (little-endian); which dtype the field needs is checked
on unpacking (:func:`~guardedtuning.strategies.secagg.masking.unpack_masked`)."""
ADVERTISE, SHARE_KEYS, COLLECT_MASKED, UNMASK = "advertise", "share-keys", "collect-masked", "unmask"
CONSISTENCY = "consistency"
STAGES = (ADVERTISE, SHARE_KEYS, COLLECT_MASKED, CONSISTENCY, UNMASK)
CIPHERTEXT_BYTES = 2 * SHARE_BYTES + TAG_BYTES  # a b-share and an s-share, sealed


def _f(key: str, kind: str, *, nbytes: int | None = None, group: str | None = None) -> Any:
    """A payload field: record key, kind (int, bytes, ints, bytes-list), fixed byte length, aligned group."""
    return field(metadata={"key": key, "kind": kind, "nbytes": nbytes, "group": group})


@dataclass(frozen=True)
class AdvertiseRequest:
    """Asks for the client's two public keys; the round's parameters travel beside it."""


@dataclass(frozen=True)
class Advertise:
    """A client's two public keys for the round, its identity key, and its signature of the round keys."""

    c_pk: bytes = _f("c-pk", "bytes", nbytes=KEY_BYTES)
    s_pk: bytes = _f("s-pk", "bytes", nbytes=KEY_BYTES)
    id_pk: bytes = _f("id-pk", "bytes", nbytes=KEY_BYTES)
    sig: bytes = _f("sig", "bytes", nbytes=SIG_BYTES)


@dataclass(frozen=True)
class KeysRequest:
    """The signed public keys of the client's neighbours that advertised, with their identity keys."""

    nodes: list[int] = _f("nodes", "ints", group="n")
    c_pks: list[bytes] = _f("c-pks", "bytes-list", nbytes=KEY_BYTES, group="n")
    s_pks: list[bytes] = _f("s-pks", "bytes-list", nbytes=KEY_BYTES, group="n")
    id_pks: list[bytes] = _f("id-pks", "bytes-list", nbytes=KEY_BYTES, group="n")
    sigs: list[bytes] = _f("sigs", "bytes-list", nbytes=SIG_BYTES, group="n")


@dataclass(frozen=True)
class SharesReply:
    """Sealed shares for each neighbour, and commitments to every share (own included)."""

    dsts: list[int] = _f("dsts", "ints", group="d")
    cts: list[bytes] = _f("cts", "bytes-list", nbytes=CIPHERTEXT_BYTES, group="d")
    holders: list[int] = _f("holders", "ints", group="h")
    commit_b: list[bytes] = _f("commit-b", "bytes-list", nbytes=COMMIT_BYTES, group="h")
    commit_s: list[bytes] = _f("commit-s", "bytes-list", nbytes=COMMIT_BYTES, group="h")


@dataclass(frozen=True)
class MaskRequest:
    """Whom to mask with, and the sealed shares addressed to this client."""

    mask_with: list[int] = _f("mask-with", "ints")
    srcs: list[int] = _f("srcs", "ints", group="s")
    cts: list[bytes] = _f("cts", "bytes-list", nbytes=CIPHERTEXT_BYTES, group="s")


@dataclass(frozen=True)
class MaskedReply:
    """The masked vector (packed) and the senders whose shares did not decrypt."""

    y: np.ndarray = _f("y", "array")
    undecryptable: list[int] = _f("undecryptable", "ints")


@dataclass(frozen=True)
class ConsistencyRequest:
    """The round's survivor set (every client whose masked vector arrived), for the client to sign."""

    survivors: list[int] = _f("survivors", "ints")


@dataclass(frozen=True)
class ConsistencyReply:
    """The client's signature of the survivor set it was told."""

    sig: bytes = _f("sig", "bytes", nbytes=SIG_BYTES)


@dataclass(frozen=True)
class UnmaskRequest:
    """Which neighbours survived (reveal their b-share) or dropped (reveal their s-share), and the
    survivors' signatures of the survivor set (signer, identity key, signature)."""

    survivors: list[int] = _f("survivors", "ints")
    dropped: list[int] = _f("dropped", "ints")
    num_survivors: int = _f("num-survivors", "int")
    signers: list[int] = _f("signers", "ints", group="g")
    signer_pks: list[bytes] = _f("signer-pks", "bytes-list", nbytes=KEY_BYTES, group="g")
    signatures: list[bytes] = _f("signatures", "bytes-list", nbytes=SIG_BYTES, group="g")


@dataclass(frozen=True)
class UnmaskReply:
    """The revealed shares."""

    b_nodes: list[int] = _f("b-nodes", "ints", group="b")
    b_shares: list[bytes] = _f("b-shares", "bytes-list", nbytes=SHARE_BYTES, group="b")
    s_nodes: list[int] = _f("s-nodes", "ints", group="s")
    s_shares: list[bytes] = _f("s-shares", "bytes-list", nbytes=SHARE_BYTES, group="s")


Payload = (AdvertiseRequest | Advertise | KeysRequest | SharesReply | MaskRequest | MaskedReply | ConsistencyRequest
           | ConsistencyReply | UnmaskRequest | UnmaskReply)
P = TypeVar("P", AdvertiseRequest, Advertise, KeysRequest, SharesReply, MaskRequest, MaskedReply, ConsistencyRequest,
            ConsistencyReply, UnmaskRequest, UnmaskReply)


def to_content(payload: Payload, *, stage: str, server_round: int) -> RecordDict:
    """A payload as the records of a message's content."""
    cfg = ConfigRecord({"stage": stage, "server-round": server_round})
    content = RecordDict()
    for f in dataclasses.fields(payload):
        value = getattr(payload, f.name)
        if f.metadata["kind"] == "array":
            content[MASKED_KEY] = ArrayRecord({f.metadata["key"]: raw_array(value)})
        else:
            cfg[f.metadata["key"]] = list(value) if isinstance(value, list) else value
    content[STAGE_KEY] = cfg
    return content


def stage_of(content: RecordDict, *, source: str) -> tuple[str, int]:
    """The ``(stage, round)`` a content claims, or a MessageError."""
    cfg = content.get(STAGE_KEY) if STAGE_KEY in content else None
    if not isinstance(cfg, ConfigRecord):
        raise MessageError(f"{source}: record {STAGE_KEY!r} is missing; the secure-aggregation stage sends it")
    stage, round_ = cfg.get("stage"), cfg.get("server-round")
    if stage not in STAGES or not isinstance(round_, int) or isinstance(round_, bool):
        raise MessageError(f"{source}: stage {stage!r} / round {round_!r} is not a secure-aggregation stage")
    return stage, round_


def from_content(content: RecordDict, kind: type[P], *, stage: str, server_round: int, source: str) -> P:
    """Decode and check a payload of type ``kind`` for ``stage`` of ``server_round``."""
    got_stage, got_round = stage_of(content, source=source)
    if got_stage != stage or got_round != server_round:
        raise MessageError(f"{source}: expected stage {stage!r} of round {server_round}, got {got_stage!r} of "
                           f"round {got_round}; a stage was missed")
    cfg = content[STAGE_KEY]
    values: dict[str, Any] = {}
    groups: dict[str, int] = {}
    for f in dataclasses.fields(kind):
        key, k, nbytes, group = (f.metadata[x] for x in ("key", "kind", "nbytes", "group"))
        if k == "array":
            values[f.name] = _array(content, key, source=source)
            continue
        if key not in cfg:
            raise MessageError(f"{source}: {stage} payload lacks {key!r}")
        v = cfg[key]
        if k == "int" and not (isinstance(v, int) and not isinstance(v, bool)):
            raise MessageError(f"{source}: {key!r} is {v!r}, expected an integer")
        if k == "bytes" and not (isinstance(v, bytes) and len(v) == nbytes):
            raise MessageError(f"{source}: {key!r} must be {nbytes} bytes, got {_describe(v)}")
        if k == "ints":
            if not isinstance(v, list) or any(not isinstance(x, int) or isinstance(x, bool) for x in v):
                raise MessageError(f"{source}: {key!r} must be a list of node ids, got {_describe(v)}")
            if len(set(v)) != len(v):
                raise MessageError(f"{source}: {key!r} lists a node twice")
        if k == "bytes-list" and (not isinstance(v, list) or any(
                not isinstance(x, bytes) or len(x) != nbytes for x in v)):
            raise MessageError(f"{source}: {key!r} must be a list of {nbytes}-byte strings, got {_describe(v)}")
        if group is not None and isinstance(v, list):
            if groups.setdefault(group, len(v)) != len(v):
                raise MessageError(f"{source}: {key!r} has {len(v)} entries, not aligned with its id list")
        values[f.name] = list(v) if isinstance(v, list) else v
    return kind(**values)


def raw_array(value: np.ndarray) -> Array:
    """A 1-D numeric vector as an :class:`~flwr.app.Array` of its raw little-endian bytes (no header).

    Parameters
    ----------
    value : numpy.ndarray
        The packed masked vector (:func:`~guardedtuning.strategies.secagg.masking.pack_masked`:
        uint8 when bit-packed, else the smallest unsigned word), 1-D.

    Returns
    -------
    flwr.app.Array
        ``stype`` :data:`RAW_STYPE`, ``dtype`` the little-endian dtype string (``|u1``, ``<u2``, ...),
        ``shape`` ``(n,)`` and ``data`` exactly ``n * itemsize`` bytes.
    """
    v = np.asarray(value)
    if v.ndim != 1 or v.dtype.kind not in RAW_KINDS:
        raise ValueError(f"the masked vector must be a 1-D numeric vector but has dtype {v.dtype} and shape "
                         f"{v.shape}; pack it with masking.pack_masked")
    wire = v.dtype.newbyteorder("<")
    return Array(dtype=wire.str, shape=(int(v.size),), stype=RAW_STYPE,
                 data=np.ascontiguousarray(v, dtype=wire).tobytes())


def _array(content: RecordDict, key: str, *, source: str) -> np.ndarray:
    rec = content.get(MASKED_KEY) if MASKED_KEY in content else None
    if not isinstance(rec, ArrayRecord) or key not in rec:
        raise MessageError(f"{source}: record {MASKED_KEY!r} with array {key!r} is missing; the client sends it")
    arr = rec[key]
    try:  # a client chooses the dtype string: numpy raises TypeError or ValueError (or worse) on odd ones
        dtype = np.dtype(arr.dtype) if isinstance(arr.dtype, str) and len(arr.dtype) <= 16 else None
    except Exception:  # noqa: BLE001 - any failure to parse it is the client's malformed upload
        dtype = None
    if (arr.stype != RAW_STYPE or dtype is None or dtype.kind not in RAW_KINDS or dtype.byteorder == ">"
            or dtype.subdtype is not None or dtype.names is not None):
        raise MessageError(f"{source}: masked vector has stype {str(arr.stype)[:40]!r} and dtype "
                           f"{str(arr.dtype)[:40]!r}; expected stype {RAW_STYPE!r} and a little-endian numeric "
                           "dtype (wire.raw_array)")
    shape = tuple(arr.shape)
    data = arr.data
    if len(shape) != 1 or not isinstance(data, bytes) or len(data) != shape[0] * dtype.itemsize:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise MessageError(f"{source}: masked vector of shape {str(shape)[:60]} and dtype {dtype} carries {got} bytes; "
                           "expected one dimension and size * itemsize bytes")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


def _describe(v: Any) -> str:
    if isinstance(v, list):
        return f"a list of {len(v)} {type(v[0]).__name__ if v else 'items'}"
    return f"{type(v).__name__} of length {len(v)}" if isinstance(v, bytes) else repr(v)
