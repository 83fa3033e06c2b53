"""Client-side handlers of secure aggregation: plain functions the ClientApp calls.

Three calls, all keyed on the client's ``context.state`` (a RecordDict):

1. :func:`begin_round` with the round's first message content (when
   :func:`is_secure_round`; else :func:`forget_round`): stores the public round
   parameters (``secagg`` / ``secagg-setup`` records) for the round's later messages;
   :func:`in_secure_round` then tells the final training step to seal, not send.
   :func:`unpack_global` reads the global adapters from the same content, fp32 or
   quantized (``arrays-codec``).
2. :func:`seal_update` with the client's adapter update at the end of local training:
   applies error feedback, norm clipping and quantization on the public support, folds
   in the weight, keeps the result (never sent in the clear) and returns the
   ``advertise`` content (two public keys) to put in the final training reply *instead
   of* the update.
3. :func:`client_stage` (or :func:`handle_stage_message` for a whole ``train.secagg``
   Message) for each later stage: ``share-keys``, ``collect-masked``, ``unmask``.

State keys: ``secagg.setup`` / ``secagg.setup-arrays`` (the round parameters),
``secagg.client`` / ``secagg.client-arrays`` (keys, shares, input; dropped after the
unmask stage) and ``secagg.residual`` (the error-feedback residual, kept across rounds).
Every problem raises :class:`~guardedtuning.errors.MessageError`, which Flower turns into
an error reply; the server then counts this client as dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from guardedtuning.codecs import compress_update, decode_downlink, flatten
from guardedtuning.errors import MessageError
from guardedtuning.strategies.secagg.client import ClientSecAgg
from guardedtuning.strategies.secagg.masking import clamp_weight, fold_weight
from guardedtuning.strategies.secagg.params import CONFIG_KEY, SETUP_KEY, RoundParams
from guardedtuning.strategies.secagg.wire import (
    ADVERTISE,
    COLLECT_MASKED,
    SHARE_KEYS,
    UNMASK,
    KeysRequest,
    MaskRequest,
    UnmaskRequest,
    from_content,
    stage_of,
    to_content,
)
from guardedtuning.wire.records import get_record

STATE_SETUP, STATE_SETUP_ARRAYS = "secagg.setup", "secagg.setup-arrays"
STATE_CLIENT, STATE_CLIENT_ARRAYS = "secagg.client", "secagg.client-arrays"
STATE_RESIDUAL = "secagg.residual"
CODEC_KEY = "arrays-codec"
R = TypeVar("R", ConfigRecord, ArrayRecord)
_REQUESTS = {SHARE_KEYS: (KeysRequest, "share_keys"), COLLECT_MASKED: (MaskRequest, "masked_input"),
             UNMASK: (UnmaskRequest, "unmask")}


def is_secure_round(content: RecordDict) -> bool:
    """Whether a round's first message asks for secure aggregation."""
    return CONFIG_KEY in content


def in_secure_round(state: RecordDict) -> bool:
    """Whether :func:`begin_round` stored a round that has not finished (seal instead of sending the update)."""
    return STATE_SETUP in state


def forget_round(state: RecordDict) -> None:
    """Drop an unfinished round's parameters and keys (keeps the error-feedback residual).

    Call it on the first message of a round that is *not* secure, so that a refused
    earlier round does not make the next final reply sealed.
    """
    _clear(state, (STATE_CLIENT, STATE_CLIENT_ARRAYS, STATE_SETUP, STATE_SETUP_ARRAYS))


def begin_round(content: RecordDict, state: RecordDict, *, node_id: int) -> RoundParams:
    """Check and store the round's public parameters; forget any unfinished earlier round."""
    source = f"first message of the round to node {node_id}"
    cfg = get_record(content, CONFIG_KEY, ConfigRecord, source=source, sender="SecureSparseFedAvg strategy")
    setup = get_record(content, SETUP_KEY, ArrayRecord, source=source, sender="SecureSparseFedAvg strategy")
    params = RoundParams.from_records(cfg, setup, source=source)
    if node_id not in params.graph:
        raise MessageError(f"{source}: node {node_id} is not among the round's participants")
    _clear(state, (STATE_CLIENT, STATE_CLIENT_ARRAYS))
    state[STATE_SETUP], state[STATE_SETUP_ARRAYS] = cfg, setup
    return params


def unpack_global(content: RecordDict, *, source: str) -> dict[str, np.ndarray]:
    """The global adapters of a first message: fp32 ``arrays``, or quantized ones with ``arrays-codec``."""
    arrays = get_record(content, "arrays", ArrayRecord, source=source, sender="ServerApp")
    if CODEC_KEY not in content:
        return {k: arrays[k].numpy() for k in arrays.keys()}
    codec = get_record(content, CODEC_KEY, ConfigRecord, source=source, sender="SecureSparseFedAvg strategy")
    names, scales, bits = codec.get("names"), codec.get("scales"), codec.get("bits")
    if not isinstance(names, list) or not isinstance(scales, list) or len(names) != len(scales) or \
            set(names) != set(arrays.keys()) or not isinstance(bits, int):
        raise MessageError(f"{source}: {CODEC_KEY!r} does not describe the arrays it came with")
    try:
        return decode_downlink({k: arrays[k].numpy() for k in names}, dict(zip(names, scales, strict=True)),
                               bits=bits)
    except ValueError as exc:
        raise MessageError(f"{source}: downlink cannot be decoded: {exc}") from exc


def _state(state: RecordDict, key: str, kind: type[R], *, node_id: int, hint: str) -> R:
    rec = state.get(key) if key in state else None
    if not isinstance(rec, kind):
        raise MessageError(f"node {node_id}: state {key!r} is missing or damaged; {hint}")
    return rec


def _params(state: RecordDict, *, node_id: int) -> RoundParams:
    hint = "begin_round must run on the round's first message"
    return RoundParams.from_records(_state(state, STATE_SETUP, ConfigRecord, node_id=node_id, hint=hint),
                                    _state(state, STATE_SETUP_ARRAYS, ArrayRecord, node_id=node_id, hint=hint),
                                    source=f"state of node {node_id}")


def seal_update(
    update: Mapping[str, np.ndarray], *, num_examples: float, state: RecordDict, node_id: int, seed: int | None = None
) -> RecordDict:
    """Compress and keep this client's update; return the ``advertise`` reply content.

    Parameters
    ----------
    update : mapping of str to numpy.ndarray
        The adapter update (local minus global), by tensor name; must be finite.
    num_examples : float
        Examples behind the update; the weight is this rounded and capped at ``max_weight``.
    state : RecordDict
        The client's ``context.state``.
    node_id : int
        This client's node id.
    seed : int, optional
        Seeds the stochastic rounding; fresh OS entropy when omitted.

    Returns
    -------
    RecordDict
        The records to add to the final training reply (it must not carry the update).
    """
    params = _params(state, node_id=node_id)
    source = f"update of node {node_id}"
    flat = flatten(update)
    if flat.size != params.size:
        raise MessageError(f"{source}: {flat.size} values, but the round's adapter has {params.size}")
    if not np.isfinite(flat).all():
        raise MessageError(f"{source}: holds NaN or inf; it is not sent (check the learning rate)")
    residual = None
    kept = state.get(STATE_RESIDUAL) if STATE_RESIDUAL in state else None
    if isinstance(kept, ArrayRecord) and "residual" in kept:
        old = kept["residual"].numpy()
        residual = old if old.shape == flat.shape else None  # the adapter changed: start afresh
    comp = compress_update(update=flat, residual=residual, support=params.support, bits=params.bits,
                           clip=params.clip, norm_clip=params.norm_clip, rng=np.random.default_rng(seed))
    try:
        weight = clamp_weight(num_examples, max_weight=params.max_weight)
    except ValueError as exc:
        raise MessageError(f"{source}: {exc}") from exc
    client, advert = ClientSecAgg.start(params=params, node=node_id,
                                        x=fold_weight(comp.q, weight=weight, max_weight=params.max_weight))
    state[STATE_RESIDUAL] = ArrayRecord({"residual": Array(comp.residual.astype(np.float32))})
    _save(client, state)
    return to_content(advert, stage=ADVERTISE, server_round=params.server_round)


def client_stage(stage: str, content: RecordDict, state: RecordDict, *, node_id: int) -> RecordDict:
    """Answer one stage request (``share-keys``, ``collect-masked`` or ``unmask``) from the state."""
    if stage not in _REQUESTS:
        raise MessageError(f"node {node_id}: unknown secure-aggregation stage {stage!r}; "
                           f"expected one of {sorted(_REQUESTS)}")
    params = _params(state, node_id=node_id)
    hint = f"a {stage} request needs a sealed update (seal_update runs at the end of training)"
    client = ClientSecAgg.from_records(_state(state, STATE_CLIENT, ConfigRecord, node_id=node_id, hint=hint),
                                       _state(state, STATE_CLIENT_ARRAYS, ArrayRecord, node_id=node_id, hint=hint),
                                       params=params)
    kind, method = _REQUESTS[stage]
    req = from_content(content, kind, stage=stage, server_round=params.server_round,
                       source=f"{stage} request to node {node_id}")
    reply = getattr(client, method)(req)
    if stage == UNMASK:
        forget_round(state)
    else:
        _save(client, state)
    return to_content(reply, stage=stage, server_round=params.server_round)


def handle_stage_message(msg: Message, context: Context) -> Message:
    """A whole ``train.secagg`` message: read its stage, answer it, reply."""
    stage, _ = stage_of(msg.content, source=f"train.secagg message to node {context.node_id}")
    return Message(client_stage(stage, msg.content, context.state, node_id=context.node_id), reply_to=msg)


def _save(client: ClientSecAgg, state: RecordDict) -> None:
    state[STATE_CLIENT], state[STATE_CLIENT_ARRAYS] = client.to_records()


def _clear(state: RecordDict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in state:
            del state[key]
