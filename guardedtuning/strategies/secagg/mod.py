"""The client side of secure aggregation as a Flower client mod: ``(msg, context, call_next) -> Message``.

Install it on the ClientApp, ``ClientApp(mods=[secagg_mod])``, and serve the server side
with :class:`guardedtuning.strategies.secure.SecureAggregation` around any Message-API
strategy: the way Flower composes DP (``DifferentialPrivacyClientSideFixedClipping`` +
``fixedclipping_mod``). The app's own handlers stay plain: they receive ``arrays`` (fp32,
the global weights) and reply with either

- ``arrays`` (the client's new weights: a plain Flower ClientApp), or
- ``update`` (an adapter delta, local minus global: GuardedTuning's handlers),

and ``num-examples`` in the ``metrics`` record. Nothing else is needed from the app.

What the mod does with a ``train`` (or ``train.<action>``) message, by the
``secagg-stage`` record it carries (:mod:`.wire`):

============================  =================================================================
message                       the mod
============================  =================================================================
stage ``advertise``           checks and keeps the round's public parameters (``secagg`` /
                              ``secagg-setup``), makes the round's keys; replies its two public
                              keys (the app is not called)
stage ``share-keys``          checks the neighbours' signed keys against their pinned identity
                              keys; replies its sealed shares (the app is not called)
stage ``collect-masked``      the round's first training message: keeps the mask request,
                              hands the app a plain ``arrays`` record (decoded if the strategy
                              quantized it, ``arrays-codec``) and seals the app's reply
stage ``consistency``         signs the survivor set it is told (the app is not called)
stage ``unmask``              checks a quorum of signatures of that set; reveals the shares the
                              round needs, forgets the round
no stage, a secure round on   a later message of the round (split learning sends many): the
                              app's reply is sealed if it carries ``update`` or ``arrays``,
                              else passed on as is
no stage, with ``arrays``     the first message of a plain round: any unfinished secure round
                              is forgotten; the reply is not touched
============================  =================================================================

*Sealing* a reply: the update (``update``, or ``arrays`` minus the global the app was
given) gets error feedback, norm clipping and quantization on the public support
(:func:`guardedtuning.codecs.compress_update`), the weight (``num-examples``, rounded
and capped at ``max-weight``) is folded in, and the result is masked. An ``update`` may leave out tensors the client froze (LoRA's A
under ``aggregation.scope=lora-b``): they count as zero and keep no residual, and a reply
leaving out a tensor the round's support covers is refused. The reply then
carries the masked vector (``secagg-masked`` and ``secagg-stage``) instead of the update,
and its ``metrics`` without ``num-examples``; its other records are kept. A reply that
is an error passes unchanged (the server counts the client as dropped).

State (``context.state``): ``secagg.setup`` / ``secagg.setup-arrays`` (the round's
parameters), ``secagg.client`` / ``secagg.client-arrays`` (keys, shares, masked input),
``secagg.mask-request`` and ``secagg.global`` (between the round's first training
message and its sealed reply) and ``secagg.residual`` (error feedback, kept across
rounds), ``secagg.identity`` (the client's long-term Ed25519 identity key, made at its
first secure round) and ``secagg.pins`` (the identity key of every node it has seen,
pinned at first sight); the last three outlive a round. Every problem raises
:class:`~guardedtuning.errors.MessageError`, which Flower turns into an error reply.
Imports no torch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from guardedtuning.codecs import compress_update, decode_downlink, flatten
from guardedtuning.errors import MessageError
from guardedtuning.strategies.secagg.client import SHARED, ClientSecAgg
from guardedtuning.strategies.secagg.graph import Policy
from guardedtuning.strategies.secagg.keys import new_identity
from guardedtuning.strategies.secagg.masking import clamp_weight, fold_weight
from guardedtuning.strategies.secagg.params import CONFIG_KEY, SETUP_KEY, RoundParams
from guardedtuning.strategies.secagg.wire import (
    ADVERTISE,
    COLLECT_MASKED,
    CONSISTENCY,
    MASKED_KEY,
    SHARE_KEYS,
    STAGE_KEY,
    UNMASK,
    AdvertiseRequest,
    ConsistencyRequest,
    KeysRequest,
    MaskRequest,
    UnmaskRequest,
    from_content,
    stage_of,
    to_content,
)

STATE_SETUP, STATE_SETUP_ARRAYS = "secagg.setup", "secagg.setup-arrays"
STATE_CLIENT, STATE_CLIENT_ARRAYS = "secagg.client", "secagg.client-arrays"
STATE_MASK_REQUEST, STATE_GLOBAL = "secagg.mask-request", "secagg.global"
STATE_RESIDUAL = "secagg.residual"
STATE_IDENTITY, STATE_PINS = "secagg.identity", "secagg.pins"
ROUND_STATE = (STATE_SETUP, STATE_SETUP_ARRAYS, STATE_CLIENT, STATE_CLIENT_ARRAYS, STATE_MASK_REQUEST, STATE_GLOBAL)
CODEC_KEY = "arrays-codec"
ARRAYS_KEY, UPDATE_KEY, METRICS_KEY, WEIGHT_KEY = "arrays", "update", "metrics", "num-examples"
SENDER = "SecureAggregation strategy"
R = TypeVar("R", ConfigRecord, ArrayRecord)
_REQUESTS = {SHARE_KEYS: (KeysRequest, "share_keys"), CONSISTENCY: (ConsistencyRequest, "consistency"),
             UNMASK: (UnmaskRequest, "unmask")}


# ---------------------------------------------------------------------------- the mod

class SecAggMod:
    """The client mod (see the module docstring); :data:`secagg_mod` is the instance to install.

    Parameters
    ----------
    rounding_seed : callable, optional
        ``(node_id, server_round) -> int`` seeding the stochastic rounding of the sent
        values; fresh OS entropy when omitted (the default, and what deployments use).
        Only tests pass it, to compare the aggregate with a plaintext computation.
    policy : Policy, optional
        The security parameter and collusion fraction this client assumes
        (:class:`~guardedtuning.strategies.secagg.graph.Policy`: 40 bits, 1/3 by default); it
        refuses a round whose degree, threshold or quorum falls short of them.
    """

    def __init__(self, *, rounding_seed: Callable[[int, int], int] | None = None,
                 policy: Policy | None = None) -> None:
        self.rounding_seed = rounding_seed
        self.policy = policy or Policy()

    def __call__(self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type.split(".")[0] != "train":
            return call_next(msg, context)
        content, state, node = msg.content, context.state, context.node_id
        if STAGE_KEY in content:
            stage, _ = stage_of(content, source=f"secure-aggregation message to node {node}")
            if stage == ADVERTISE:
                return Message(advertise(content, state, node_id=node, run_id=context.run_id, policy=self.policy),
                               reply_to=msg)
            if stage != COLLECT_MASKED:
                return Message(client_stage(stage, content, state, node_id=node), reply_to=msg)
            msg = copy.copy(msg)  # the app gets its own view; the message as received stays as it is
            msg.content = begin_training(content, state, node_id=node)
        elif ARRAYS_KEY in content:
            forget_round(state)  # a plain round: an unfinished secure one must not seal its reply
        reply = call_next(msg, context)
        if not in_training(state) or reply.has_error():
            return reply
        if UPDATE_KEY not in reply.content and ARRAYS_KEY not in reply.content:
            return reply  # an intermediate reply of a multi-message round (split learning)
        params = _params(state, node_id=node)
        seed = None if self.rounding_seed is None else self.rounding_seed(node, params.server_round)
        reply.content = seal_reply(reply.content, state, node_id=node, seed=seed)
        return reply


secagg_mod = SecAggMod()
"""The secure-aggregation client mod: ``ClientApp(mods=[secagg_mod])``."""


# ---------------------------------------------------------------------------- the stages

def advertise(content: RecordDict, state: RecordDict, *, node_id: int, run_id: int,
              policy: Policy | None = None) -> RecordDict:
    """Stage ``advertise``: check and keep the round's public parameters, make its keys, return them signed.

    The parameters must name this client's run (``run_id``, its ``context.run_id``: the
    graph seed derives from it) and meet ``policy``. Any unfinished earlier round is
    forgotten (the error-feedback residual, the identity key and the pins are kept).
    """
    source = f"advertise request to node {node_id}"
    cfg = _record(content, CONFIG_KEY, ConfigRecord, source=source)
    setup = _record(content, SETUP_KEY, ArrayRecord, source=source)
    params = RoundParams.from_records(cfg, setup, source=source)
    from_content(content, AdvertiseRequest, stage=ADVERTISE, server_round=params.server_round, source=source)
    if node_id not in params.graph:
        raise MessageError(f"{source}: node {node_id} is not among the round's participants")
    if params.run_id != run_id:
        raise MessageError(f"{source}: the round names run {params.run_id}, but this client is in run {run_id} "
                           "(the graph seed derives from the run id); refused")
    forget_round(state)
    identity, pins = _identity(state), _pins(state)
    client, advert = ClientSecAgg.start(params=params, node=node_id, identity=identity, pins=pins, policy=policy)
    state[STATE_SETUP], state[STATE_SETUP_ARRAYS] = cfg, setup
    _save(client, state)
    return to_content(advert, stage=ADVERTISE, server_round=params.server_round)


def client_stage(stage: str, content: RecordDict, state: RecordDict, *, node_id: int) -> RecordDict:
    """Stage ``share-keys`` or ``unmask``: answer the request from the state."""
    if stage not in _REQUESTS:
        raise MessageError(f"node {node_id}: stage {stage!r} is not a request this client answers alone; "
                           f"expected one of {sorted(_REQUESTS)}")
    params = _params(state, node_id=node_id)
    client = _client(state, params, node_id=node_id, hint=f"a {stage} request needs the round's keys "
                                                           "(the advertise stage makes them)")
    kind, method = _REQUESTS[stage]
    req = from_content(content, kind, stage=stage, server_round=params.server_round,
                       source=f"{stage} request to node {node_id}")
    reply = getattr(client, method)(req)
    _save(client, state)  # the pins (signers seen at unmask) outlive the round
    if stage == UNMASK:
        forget_round(state)
    return to_content(reply, stage=stage, server_round=params.server_round)


def begin_training(content: RecordDict, state: RecordDict, *, node_id: int) -> RecordDict:
    """The round's first training message: keep its mask request; the content the app sees.

    The app gets the message's records without the secure-aggregation ones, and the
    global arrays as plain fp32 ``arrays`` (decoded when the strategy quantized them).
    """
    source = f"first training message of the round to node {node_id}"
    params = _params(state, node_id=node_id)
    client = _client(state, params, node_id=node_id, hint="a training message of a secure round arrived "
                                                          "before its key stages")
    if client.stage != SHARED:
        raise MessageError(f"{source}: the round's keys are in state {client.stage!r}, expected {SHARED!r}; "
                           "a stage was missed")
    from_content(content, MaskRequest, stage=COLLECT_MASKED, server_round=params.server_round, source=source)
    glob = unpack_global(content, source=source)
    state[STATE_MASK_REQUEST] = content[STAGE_KEY]
    state[STATE_GLOBAL] = ArrayRecord({k: Array(v) for k, v in glob.items()})
    out = RecordDict({k: v for k, v in content.items() if k not in (STAGE_KEY, CODEC_KEY, MASKED_KEY)})
    out[ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in glob.items()})
    return out


def seal_reply(content: RecordDict, state: RecordDict, *, node_id: int, seed: int | None = None) -> RecordDict:
    """The app's final reply with its update sealed: masked vector in, update and weight out.

    Parameters
    ----------
    content : RecordDict
        The app's reply: ``update`` (a delta) or ``arrays`` (new weights), and ``metrics``
        with ``num-examples``.
    state : RecordDict
        The client's ``context.state`` (after :func:`begin_training`).
    node_id : int
        This client's node id.
    seed : int, optional
        Seeds the stochastic rounding; fresh OS entropy when omitted.

    Returns
    -------
    RecordDict
        The reply's records without ``update`` / ``arrays`` and without ``num-examples``,
        plus the masked vector.
    """
    source = f"reply of node {node_id}"
    params = _params(state, node_id=node_id)
    metrics = _record(content, METRICS_KEY, MetricRecord, source=source, sender="ClientApp")
    weight = metrics.get(WEIGHT_KEY)
    if isinstance(weight, (bool, list)) or not isinstance(weight, (int, float)):
        raise MessageError(f"{source}: metric {WEIGHT_KEY!r} is {weight!r}, expected a number; the ClientApp "
                           "sends its example count with its update")
    key = UPDATE_KEY if UPDATE_KEY in content else ARRAYS_KEY
    got = _arrays(_record(content, key, ArrayRecord, source=source, sender="ClientApp"))
    glob = _arrays(_state(state, STATE_GLOBAL, ArrayRecord, node_id=node_id,
                          hint="the global arrays are kept from the round's first training message"))
    if not set(got) <= set(glob) or any(got[k].shape != glob[k].shape for k in got):
        raise MessageError(f"{source}: {key!r} does not match the global arrays it was sent (names "
                           f"{sorted(set(got) - set(glob))[:3]} or shapes differ); it is not sent")
    frozen = sorted(set(glob) - set(got))
    _check_frozen(frozen, glob, params.support, source=source)
    if key == UPDATE_KEY:
        update = dict(got)
    else:
        update = {k: got[k].astype(np.float64) - glob[k].astype(np.float64) for k in got}
    update.update({k: np.zeros(glob[k].shape, np.float32) for k in frozen})
    req = from_content(_state_content(state, node_id=node_id), MaskRequest, stage=COLLECT_MASKED,
                       server_round=params.server_round, source=f"state of node {node_id}")
    masked = seal_update(update, num_examples=float(weight), state=state, node_id=node_id, request=req, seed=seed,
                         frozen=frozen)
    out = RecordDict({k: v for k, v in content.items() if k not in (UPDATE_KEY, ARRAYS_KEY, METRICS_KEY)})
    out[METRICS_KEY] = MetricRecord({k: v for k, v in metrics.items() if k != WEIGHT_KEY})
    for k, v in masked.items():
        out[k] = v
    return out


def _check_frozen(frozen: list[str], glob: Mapping[str, np.ndarray], support: np.ndarray, *, source: str) -> None:
    """A tensor left out of the reply was frozen (not trained): fine only if none of it is on the support.

    Under ``aggregation.scope=lora-b`` the clients freeze LoRA's A and the support never holds it;
    a left-out tensor the support does cover would be sent as zeros (the server would average
    a zero in for this client), so the reply is refused instead.
    """
    if not frozen:
        return
    start, on_support = 0, []
    for name in sorted(glob):
        n = int(glob[name].size)
        if name in frozen and np.any((support >= start) & (support < start + n)):
            on_support.append(name)
        start += n
    if on_support:
        raise MessageError(f"{source}: the update leaves out {on_support[:3]}, which the round's support covers; "
                           "a client leaves out only tensors it froze and the support never holds (LoRA's A "
                           "under aggregation.scope=lora-b): set aggregation.scope=lora-b on both sides, or train "
                           "those tensors")


def seal_update(
    update: Mapping[str, np.ndarray], *, num_examples: float, state: RecordDict, node_id: int,
    request: MaskRequest, seed: int | None = None, frozen: list[str] | tuple[str, ...] = (),
) -> RecordDict:
    """Compress, fold and mask this client's update; the ``collect-masked`` reply content.

    Parameters
    ----------
    update : mapping of str to numpy.ndarray
        The adapter update (local minus global), by tensor name; must be finite.
    num_examples : float
        Examples behind the update; the weight is this rounded and capped at ``max_weight``.
    state : RecordDict
        The client's ``context.state`` (the round's keys in stage ``shared``).
    node_id : int
        This client's node id.
    request : MaskRequest
        The round's mask request (whom to mask with, the shares sent to this client).
    seed : int, optional
        Seeds the stochastic rounding; fresh OS entropy when omitted.
    frozen : sequence of str
        Tensors this client did not train (their update is zero, off the support): no
        error-feedback residual is kept for them, and any kept earlier is dropped.
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
    dead = _coordinates(update, frozen)
    if residual is not None and dead.size:
        residual = residual.astype(np.float64)
        residual[dead] = 0.0
    comp = compress_update(update=flat, residual=residual, support=params.support, bits=params.bits,
                           clip=params.clip, norm_clip=params.norm_clip, rng=np.random.default_rng(seed))
    try:
        weight = clamp_weight(num_examples, max_weight=params.max_weight)
    except ValueError as exc:
        raise MessageError(f"{source}: {exc}") from exc
    client = _client(state, params, node_id=node_id, hint="sealing needs the round's keys")
    reply = client.masked_input(request, x=fold_weight(comp.q, weight=weight, max_weight=params.max_weight))
    left = comp.residual.astype(np.float32)
    left[dead] = 0.0  # already zero (a zero update off the support); explicit: nothing of a frozen tensor is kept
    state[STATE_RESIDUAL] = ArrayRecord({"residual": Array(left)})
    _save(client, state)
    _clear(state, (STATE_MASK_REQUEST, STATE_GLOBAL))
    return to_content(reply, stage=COLLECT_MASKED, server_round=params.server_round)


def unpack_global(content: RecordDict, *, source: str) -> dict[str, np.ndarray]:
    """The global arrays of a first message, as float32: fp32 ``arrays``, or quantized ones with ``arrays-codec``."""
    arrays = _record(content, ARRAYS_KEY, ArrayRecord, source=source, sender="ServerApp")
    if CODEC_KEY not in content:
        out = {k: arrays[k].numpy() for k in arrays.keys()}
        bad = sorted(k for k, v in out.items() if v.dtype.kind != "f" or not np.isfinite(v).all())
        if bad:
            raise MessageError(f"{source}: global arrays {bad[:3]} are not finite floats")
        return {k: v.astype(np.float32) for k, v in out.items()}
    codec = _record(content, CODEC_KEY, ConfigRecord, source=source)
    names, scales, bits = codec.get("names"), codec.get("scales"), codec.get("bits")
    if not isinstance(names, list) or not isinstance(scales, list) or len(names) != len(scales) or \
            set(names) != set(arrays.keys()) or not isinstance(bits, int):
        raise MessageError(f"{source}: {CODEC_KEY!r} does not describe the arrays it came with")
    try:
        return decode_downlink({k: arrays[k].numpy() for k in names}, dict(zip(names, scales, strict=True)),
                               bits=bits)
    except ValueError as exc:
        raise MessageError(f"{source}: downlink cannot be decoded: {exc}") from exc


def in_training(state: RecordDict) -> bool:
    """Whether a secure round's training is under way (its sealed reply is still to come)."""
    return STATE_MASK_REQUEST in state


def forget_round(state: RecordDict) -> None:
    """Drop an unfinished round's parameters, keys and mask request (keeps the error-feedback residual)."""
    _clear(state, ROUND_STATE)


# ---------------------------------------------------------------------------- helpers

def _coordinates(arrays: Mapping[str, np.ndarray], names: list[str] | tuple[str, ...]) -> np.ndarray:
    """Flat indices (sorted-name order, as :func:`~guardedtuning.codecs.flatten`) of the tensors ``names``."""
    out, start = [], 0
    for name in sorted(arrays):
        n = int(np.size(arrays[name]))
        if name in names:
            out.append(np.arange(start, start + n, dtype=np.int64))
        start += n
    return np.concatenate(out) if out else np.empty(0, np.int64)


def _record(content: RecordDict, key: str, kind: type[R], *, source: str, sender: str = SENDER) -> R:
    rec = content.get(key) if key in content else None
    if rec is None:
        raise MessageError(f"{source}: record {key!r} is missing; it is sent by the {sender}")
    if not isinstance(rec, kind):
        raise MessageError(f"{source}: record {key!r} is a {type(rec).__name__}, expected {kind.__name__}")
    return rec


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def _state(state: RecordDict, key: str, kind: type[R], *, node_id: int, hint: str) -> R:
    rec = state.get(key) if key in state else None
    if not isinstance(rec, kind):
        raise MessageError(f"node {node_id}: state {key!r} is missing or damaged; {hint}")
    return rec


def _state_content(state: RecordDict, *, node_id: int) -> RecordDict:
    req = _state(state, STATE_MASK_REQUEST, ConfigRecord, node_id=node_id,
                 hint="the mask request is kept from the round's first training message")
    return RecordDict({STAGE_KEY: req})


def _params(state: RecordDict, *, node_id: int) -> RoundParams:
    hint = "the round's advertise stage must run first"
    return RoundParams.from_records(_state(state, STATE_SETUP, ConfigRecord, node_id=node_id, hint=hint),
                                    _state(state, STATE_SETUP_ARRAYS, ArrayRecord, node_id=node_id, hint=hint),
                                    source=f"state of node {node_id}")


def _client(state: RecordDict, params: RoundParams, *, node_id: int, hint: str) -> ClientSecAgg:
    return ClientSecAgg.from_records(_state(state, STATE_CLIENT, ConfigRecord, node_id=node_id, hint=hint),
                                     _state(state, STATE_CLIENT_ARRAYS, ArrayRecord, node_id=node_id, hint=hint),
                                     params=params, identity=_identity(state), pins=_pins(state))


def _identity(state: RecordDict) -> bytes:
    """The client's long-term identity key, made (and kept in ``state``) at its first secure round."""
    rec = state.get(STATE_IDENTITY) if STATE_IDENTITY in state else None
    if isinstance(rec, ConfigRecord) and isinstance(rec.get("sk"), bytes) and len(rec["sk"]) == 32:
        return rec["sk"]
    if rec is not None:
        raise MessageError(f"state {STATE_IDENTITY!r} is damaged; this client's identity key is lost, and its "
                           "neighbours pinned it: start a new run")
    sk, _ = new_identity()
    state[STATE_IDENTITY] = ConfigRecord({"sk": sk})
    return sk


def _pins(state: RecordDict) -> dict[int, bytes]:
    """node -> identity public key, as pinned at first sight (kept in ``state``)."""
    rec = state.get(STATE_PINS) if STATE_PINS in state else None
    if rec is None:
        return {}
    nodes, keys = (rec.get("nodes"), rec.get("keys")) if isinstance(rec, ConfigRecord) else (None, None)
    if not isinstance(nodes, list) or not isinstance(keys, list) or len(nodes) != len(keys):
        raise MessageError(f"state {STATE_PINS!r} is damaged; the pinned identity keys are lost: start a new run")
    return dict(zip(nodes, keys, strict=True))


def _save(client: ClientSecAgg, state: RecordDict) -> None:
    state[STATE_CLIENT], state[STATE_CLIENT_ARRAYS] = client.to_records()
    nodes = sorted(client.pins)
    state[STATE_PINS] = ConfigRecord({"nodes": nodes, "keys": [client.pins[v] for v in nodes]})


def _clear(state: RecordDict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in state:
            del state[key]
