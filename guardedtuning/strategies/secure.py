"""Secure aggregation of sparse, quantized updates as a wrapper around any Message-API strategy.

:class:`SecureAggregation` wraps a strategy the way Flower's
``DifferentialPrivacyClientSideFixedClipping`` does, and needs
:data:`guardedtuning.strategies.secagg.mod.secagg_mod` installed on the ClientApp
(``ClientApp(mods=[secagg_mod])``); the app's handlers stay plain (they reply
``arrays`` or ``update``, and ``num-examples``). One round:

1. ``configure_train(server_round, arrays, config, grid)`` lets the wrapped strategy
   sample the clients and build their training messages, then runs the two key stages
   on the grid it was handed (``advertise``: the round's public parameters out, two
   public keys back; ``share-keys``: sealed Shamir shares), and returns the training
   messages with each client's mask request added (the global arrays optionally
   quantized, ``downlink_bits``). Clients that failed a key stage get no training
   message; too few left, and it returns none (the round is refused).
2. The caller runs the round's training messages (Flower's ``Strategy.start()`` does one
   ``send_and_receive``; our drivers may run many exchanges, split learning). The mod
   seals the final reply: it carries the masked update instead of the update.
3. ``aggregate_train(server_round, replies)`` takes the final replies, has the survivors
   sign the survivor set (``consistency``) and asks them, with the signatures, for the
   shares that remove the masks (``unmask``): two exchanges on the round's grid,
   and hands the wrapped strategy *one* reply: the new global arrays (sent global plus
   the unmasked weighted mean update) with ``num-examples`` the survivors' total weight,
   as Flower's own SecAgg+ workflow hands its strategy one aggregated result. It returns
   the wrapped strategy's result: the new global arrays; ``None`` when the round is
   refused (fewer than ``threshold`` clients or shares left; masks that did not cancel),
   in which case the global model must stay unchanged.

Where the stages run: the key stages need a grid and no client input, so they run in
``configure_train``, which Flower hands the grid. The unmask stage must follow the
masked uploads, and ``aggregate_train`` gets no grid; it uses the grid of the same
round's ``configure_train`` (bound to that round, used once, then dropped). Both
Flower's ``Strategy.start()`` and our drivers call ``configure_train`` first, so the
grid is the round's own.

Stage messages go with the round's training message type (``train``, ``train.split``,
...), so they reach the mod of any ClientApp that handles that type, with no handler
of their own. Bytes: the returned MetricRecord holds ``secagg-bytes-up`` /
``secagg-bytes-down``, the serialized size of the stage messages (the caller counts the
training messages and replies itself), and ``dense-bytes``, what the same clients'
dense fp32 updates would have taken. :attr:`SecureAggregation.rejections` lists every
client rejected in the round, with its reason, once ``aggregate_train`` ran (or at once
when ``configure_train`` refuses the round).

:class:`SecureSparseFedAvg` is :class:`~guardedtuning.strategies.fedavg.AdapterFedAvg`
under this wrapper, with its arguments.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from guardedtuning.codecs import (
    SCOPES,
    dense_coordinates,
    dequantize_mean,
    eligible_coordinates,
    encode_downlink,
    max_level,
    rand_k_support,
    scatter,
    top_k_support,
    unflatten,
)
from guardedtuning.errors import ConfigError, MessageError
from guardedtuning.strategies.fedavg import AdapterFedAvg
from guardedtuning.strategies.secagg.graph import COLLUSION, SECURITY_BITS, Policy, min_degree, round_shape
from guardedtuning.strategies.secagg.masking import PACKINGS, field_bits
from guardedtuning.strategies.secagg.mod import ARRAYS_KEY, CODEC_KEY
from guardedtuning.strategies.secagg.params import CONFIG_KEY, SETUP_KEY, SUPPORTS, RoundParams
from guardedtuning.strategies.secagg.server import RoundRefused, ServerSecAgg
from guardedtuning.strategies.secagg.wire import (
    ADVERTISE,
    COLLECT_MASKED,
    CONSISTENCY,
    SHARE_KEYS,
    STAGE_KEY,
    UNMASK,
    Advertise,
    AdvertiseRequest,
    ConsistencyReply,
    MaskedReply,
    SharesReply,
    UnmaskReply,
    from_content,
    to_content,
)
from guardedtuning.wire.exchange import exchange

log = logging.getLogger(__name__)


@dataclass
class _Round:
    """One configured round: its parameters, grid, sent global, server state and tallies."""

    params: RoundParams
    grid: Grid
    types: dict[int, str]  # node -> message type of its training message
    current: dict[str, np.ndarray]
    server: ServerSecAgg
    advertised: int = 0  # nodes whose key advertisement arrived and was valid
    rejections: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=lambda: {
        "secagg-bytes-down": 0.0, "secagg-bytes-up": 0.0, "stage-wall-s": 0.0, "server-s": 0.0})

    def reject(self, node: int, reason: str) -> None:
        msg = f"round {self.params.server_round}: node {node} rejected: {reason}"
        self.rejections.append(msg)
        log.warning("%s", msg)


class SecureAggregation(Strategy):
    """Secure aggregation (SecAgg+ style) of sparse, quantized updates around ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        The wrapped Message-API strategy (Flower's ``FedAvg``, our ``AdapterFedAvg``, ...):
        it samples and builds the training messages and aggregates the one unmasked result.
    num_sampled_clients : int
        Clients the wrapped strategy samples a round (at least 2: one client has no one to
        hide among); bounds the field size up front (see ``max_weight``).
    seed : int
        Seeds the public round seed of the rand-k support (the graph is seeded by the run id and round).
    density : float
        Fraction of the model's coordinates sent each round, in (0, 1].
    bits : int
        Bits per sent value, in [2, 32].
    clip : float
        Quantization range ``[-clip, clip]`` of the sent values (after error feedback).
    support : str
        ``"rand"`` (rand-k from the round seed) or ``"topk"`` (top-k of the accumulated
        public aggregate, with ``explore`` of the k drawn at random).
    explore : float
        Random fraction of a top-k support, in [0, 1].
    scope : str
        Coordinates a top-k support may use (:func:`~guardedtuning.codecs.eligible_coordinates`):
        ``"all"``, or ``"lora-b"`` (never LoRA's A, which then stays at its shared initial
        value; the support holds at most the eligible coordinates). Needs ``support="topk"``.
    dense_rest : bool
        Every coordinate of the tensors that are not LoRA's (:func:`~guardedtuning.codecs.dense_coordinates`:
        ``guarded``'s release projection, a head) on every round's support; the top-k fills the
        rest among LoRA's. Needs ``support="topk"``; ``density`` must leave room for them.
    degree : int
        Neighbours per client in the masking graph; 0 picks the smallest that meets
        ``security_bits`` and ``collusion`` (:func:`~.secagg.graph.min_degree`); ``>= n - 1``
        is the complete graph (plain SecAgg). Below that minimum: ``ConfigError``.
    threshold : int
        Shares needed to reconstruct a secret and the fewest survivors a round accepts;
        0 picks the smallest safe one (``> (degree + 1) / 2``, and colluders hold fewer than
        ``t - 1`` shares of any client except with probability ``2**-security_bits``). Below it: ``ConfigError``.
    security_bits : int
        ``sigma``: the graph lets colluders unmask a client with probability at most ``2**-sigma``.
        At least the clients' own (``secagg_mod``: 40), or they refuse every round.
    collusion : float
        ``gamma``: the fraction of a round's clients that may collude with the server, in
        [1/3, 1) (the clients assume 1/3). Sets the quorum ``floor((n + C) / 2) + 1`` of
        signatures of the survivor set a client needs before revealing shares.
    max_weight : int
        Cap on a client's weight (its example count). The field needs
        ``bit_length(num_sampled_clients * max_weight * (2**bits - 2))`` bits, at most 64.
    norm_clip : float
        L2 clip of each client's sent values before quantization (0: off).
    packing : str
        ``"bits"``: masked values bit-packed, exactly ``m`` bits each (smallest);
        ``"word"``: as the smallest uint word holding ``m`` bits (uint8/16/32/64).
    downlink_bits : int
        Quantize the global arrays sent to clients to this many bits (0: send fp32).
    timeout, poll : float
        Per-stage reply timeout and pull interval in seconds (``comm.timeout``,
        ``comm.poll-interval``).

    Notes
    -----
    The global arrays travel as ``arrays`` (Flower's default ``arrayrecord_key``), which is
    what :data:`~guardedtuning.strategies.secagg.mod.secagg_mod` reads and hands on; the
    one aggregated reply the wrapped strategy gets weighs by ``num-examples`` (Flower's
    default ``weighted_by_key``).
    """

    def __init__(
        self, strategy: Strategy, *, num_sampled_clients: int, seed: int = 0, density: float = 0.05, bits: int = 8,
        clip: float = 0.05, support: str = "rand", explore: float = 0.5, scope: str = "all",
        dense_rest: bool = False, degree: int = 0,
        threshold: int = 0,
        max_weight: int = 1024, norm_clip: float = 0.0, packing: str = "bits", downlink_bits: int = 0,
        timeout: float = 600.0, poll: float = 0.002, security_bits: int = SECURITY_BITS, collusion: float = COLLUSION,
    ) -> None:
        checks = (
            ("num_sampled_clients", num_sampled_clients, num_sampled_clients >= 2,
             "an integer >= 2 (one client has no one to hide among)"),
            ("density", density, 0 < density <= 1, "a number in (0, 1]"),
            ("bits", bits, 2 <= bits <= 32, "an integer in [2, 32]"),
            ("clip", clip, clip > 0, "a positive number"),
            ("support", support, support in SUPPORTS, f"one of {SUPPORTS}"),
            ("explore", explore, 0 <= explore <= 1, "a number in [0, 1]"),
            ("scope", scope, scope in SCOPES and (scope == "all" or support == "topk"),
             f"one of {SCOPES}, and `all` unless support='topk' (the server sends a scoped support)"),
            ("dense_rest", dense_rest, not dense_rest or support == "topk",
             "False unless support='topk' (the server sends the support's indices)"),
            ("degree", degree, degree >= 0, "an integer >= 0 (0 picks O(log n))"),
            ("threshold", threshold, threshold == 0 or threshold >= 2, "0 (auto) or an integer >= 2"),
            ("max_weight", max_weight, max_weight >= 1, "a positive integer"),
            ("norm_clip", norm_clip, norm_clip >= 0, "a number >= 0 (0 turns it off)"),
            ("packing", packing, packing in PACKINGS, f"one of {PACKINGS}"),
            ("downlink_bits", downlink_bits, downlink_bits == 0 or 2 <= downlink_bits <= 32, "0 (off) or in [2, 32]"),
            ("timeout", timeout, timeout > 0, "a positive number"),
            ("poll", poll, poll > 0, "a positive number"),
        )
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"`{name}` must be {allowed} but is {value!r}")
        field_bits(clients=num_sampled_clients, bits=bits, max_weight=max_weight)  # raises if over 64 bits
        check_settings(n=num_sampled_clients, degree=degree, threshold=threshold, security_bits=security_bits,
                       collusion=collusion, feasible=False)
        self.security_bits, self.collusion = security_bits, collusion
        self.strategy = strategy
        self.num_sampled_clients, self.seed = num_sampled_clients, seed
        self.density, self.bits, self.clip, self.support, self.explore = density, bits, clip, support, explore
        self.scope, self.dense_rest = scope, dense_rest
        self.degree, self.threshold, self.max_weight, self.norm_clip = degree, threshold, max_weight, norm_clip
        self.packing, self.downlink_bits, self.timeout, self.poll = packing, downlink_bits, timeout, poll
        self.rejections: list[str] = []
        self.identities: dict[int, bytes] = {}  # node -> identity key, as first relayed (clients pin the same)
        self._round: _Round | None = None
        self._unfinished: _Round | None = None  # refused at a key stage: its cost is still to be collected
        self._score: np.ndarray | None = None  # accumulated public aggregates (top-k support)

    def summary(self) -> None:
        log.info("SecureAggregation: density %s, %d bits, clip %s, support %s, scope %s, degree %s, threshold %s, "
                 "security %d bits, collusion %.3g, around:", self.density, self.bits, self.clip, self.support, self.scope,
                 self.degree or "auto", self.threshold or "auto", self.security_bits, self.collusion)
        self.strategy.summary()

    def round_seed(self, server_round: int) -> bytes:
        """The public 256-bit seed of a round's rand-k support (the graph's seed derives from the run id)."""
        return hashlib.sha256(b"gt-secagg/round/" + self.seed.to_bytes(8, "little", signed=True)
                              + server_round.to_bytes(8, "little")).digest()

    def round_params(self, server_round: int, nodes: list[int], size: int, run_id: int = 0,
                     shapes: dict[str, tuple[int, ...]] | None = None) -> RoundParams | None:
        """The round's public parameters, or None (logged) when the round cannot be secure.

        ``shapes`` (name -> shape of the global arrays) sets the coordinates a scoped top-k
        support may use; without it the support may use all ``size``.
        """
        n = len(nodes)
        degree, t, quorum = round_shape(n, degree=self.degree, threshold=self.threshold,
                                        security_bits=self.security_bits, collusion=self.collusion)
        if n < 2 or t > degree + 1 or quorum > n:
            log.warning("round %d skipped: %d clients, degree %d, threshold %d, quorum %d; secure aggregation needs "
                        "threshold <= degree + 1, quorum <= clients and 2 clients (lower aggregation.threshold or "
                        "connect more clients)", server_round, n, degree, t, quorum)
            return None
        problem = Policy(self.security_bits, self.collusion).problem(n=n, degree=degree, threshold=t, quorum=quorum)
        if problem:  # fewer clients than planned: an override may be below this round's minimum
            log.warning("round %d skipped: %s", server_round, problem)
            return None
        seed = self.round_seed(server_round)
        if self.support == "topk":
            score = self._score if self._score is not None and self._score.size == size else np.zeros(size)
            cand, always = None, None
            if (self.scope != "all" or self.dense_rest) and shapes is None:
                # a scoped support needs the tensor names; silently using all would lie
                raise ValueError(f"scope={self.scope!r} / dense_rest={self.dense_rest} needs the adapter's shapes; "
                                 "pass shapes=")
            if self.scope != "all":
                assert shapes is not None
                try:
                    cand = eligible_coordinates(shapes, scope=self.scope)
                except ValueError as exc:  # the same adapter every round: skipping would skip them all
                    raise ConfigError(f"aggregation.scope={self.scope!r} cannot be used with this adapter: {exc}; "
                                      "set aggregation.scope=all") from None
            if self.dense_rest:
                assert shapes is not None
                always = dense_coordinates(shapes)
            try:
                sup = top_k_support(score=score, density=self.density, explore=self.explore, seed=seed,
                                    candidates=cand, always=always)
            except ValueError as exc:  # the same adapter every round: skipping would skip them all
                if always is None:  # not dense-rest's: a bad score or candidate set is a bug, not a setting
                    raise
                raise ConfigError(f"aggregation.dense-rest: {exc} (aggregation.density), or set "
                                  "aggregation.dense-rest=false") from None
        else:
            sup = rand_k_support(size=size, density=self.density, seed=seed)
        try:
            return RoundParams(server_round=server_round, nodes=tuple(nodes), degree=degree, threshold=t, size=size,
                               density=self.density, support_mode=self.support, support=sup, bits=self.bits,
                               clip=self.clip, norm_clip=self.norm_clip, max_weight=self.max_weight,
                               packing=self.packing, seed=seed, run_id=run_id, quorum=quorum)
        except ValueError as exc:  # e.g. more clients than num_sampled_clients: the field exceeds 64 bits
            log.warning("round %d skipped: %s", server_round, exc)
            return None

    # ------------------------------------------------------------------ configure: the key stages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = self._unfinished = None
        msgs = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not msgs:
            return []
        types = {m.metadata.dst_node_id: m.metadata.message_type for m in msgs}
        if len(types) != len(msgs):
            log.warning("round %d skipped: the wrapped strategy sent a node two training messages", server_round)
            return []
        current = {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}
        size = int(sum(v.size for v in current.values()))
        params = self.round_params(server_round, sorted(types), size, run_id=msgs[0].metadata.run_id,
                                   shapes={k: v.shape for k, v in current.items()})
        if params is None:
            return []
        rnd = _Round(params=params, grid=grid, types=types, current=current, server=ServerSecAgg(params))
        srv, r = rnd.server, server_round
        t0 = time.perf_counter()
        try:
            sa_cfg, sa_setup = params.to_records()
            ask = to_content(AdvertiseRequest(), stage=ADVERTISE, server_round=r)
            ask[CONFIG_KEY], ask[SETUP_KEY] = sa_cfg, sa_setup
            adverts = self._known_identities(rnd, self._stage(rnd, ADVERTISE, dict.fromkeys(params.nodes, ask),
                                                              Advertise))
            rnd.advertised = len(adverts)
            keys = srv.receive_advertise(adverts)
            for node, adv in srv.keys.items():
                self.identities.setdefault(node, adv.id_pk)
            masks = srv.receive_shares(self._stage(rnd, SHARE_KEYS, keys, SharesReply))
        except RoundRefused:
            self._publish(rnd)
            self._unfinished = rnd
            return []
        finally:
            rnd.stats["server-s"] += time.perf_counter() - t0 - rnd.stats["stage-wall-s"]
        self._round = rnd
        global_records = self._downlink(arrays)
        out = []
        for m in msgs:
            node = m.metadata.dst_node_id
            if node not in masks:
                continue  # rejected at a key stage (logged)
            content = RecordDict(dict(m.content.items()))  # a copy: strategies may share one content
            for key, rec in {**global_records, **to_content(masks[node], stage=COLLECT_MASKED, server_round=r)}.items():
                content[key] = rec
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=node,
                               group_id=m.metadata.group_id))
        return out

    def _known_identities(self, rnd: _Round, adverts: dict[int, Advertise]) -> dict[int, Advertise]:
        """Leave out a node whose identity key changed since it was first relayed.

        Its neighbours pinned the old key and would refuse every round that offers the new one
        (a client that lost its ``context.state`` makes a new key), so one such node would stop
        the run; it is left out, named, until a new run.
        """
        out = {}
        for node, adv in adverts.items():
            known = self.identities.get(node)
            if known is not None and known != adv.id_pk:
                rnd.reject(node, "its identity key changed since it was first seen (a client that lost its state "
                                 "makes a new one); its neighbours pinned the old key, so it is left out of this "
                                 "run's secure rounds; it takes part again in a new run")
                continue
            out[node] = adv
        return out

    def _downlink(self, arrays: ArrayRecord) -> dict[str, ArrayRecord | ConfigRecord]:
        """The global arrays' records for the training messages: as they are, or quantized."""
        if not self.downlink_bits:
            return {}
        levels, scales = encode_downlink({k: arrays[k].numpy() for k in arrays.keys()}, bits=self.downlink_bits)
        names = sorted(levels)
        return {ARRAYS_KEY: ArrayRecord({k: Array(levels[k]) for k in names}),
                CODEC_KEY: ConfigRecord({"bits": self.downlink_bits, "names": names,
                                         "scales": [scales[k] for k in names]})}

    def _stage(self, rnd: _Round, stage: str, requests: dict, kind: type) -> dict:
        """Push one stage's requests, pull and decode the replies; lost or bad ones are logged."""
        r = rnd.params.server_round
        msgs = [Message(content=req if isinstance(req, RecordDict) else to_content(req, stage=stage, server_round=r),
                        message_type=rnd.types[node], dst_node_id=node, group_id=str(r))
                for node, req in requests.items()]
        ex = exchange(rnd.grid, msgs, timeout=self.timeout, poll=self.poll)
        rnd.stats["secagg-bytes-down"] += sum(ex.bytes_down.values())
        rnd.stats["secagg-bytes-up"] += sum(ex.bytes_up.values())
        rnd.stats["stage-wall-s"] += ex.wall_s
        for node, reason in sorted(ex.failures().items()):
            rnd.reject(node, f"dropped at {stage}: {reason}")
        out = {}
        for node, msg in ex.ok().items():
            try:
                out[node] = from_content(msg.content, kind, stage=stage, server_round=r,
                                         source=f"{stage} reply of node {node}")
            except MessageError as exc:
                rnd.server.reject(node, stage, _hint(exc, msg))
            except Exception as exc:  # noqa: BLE001 - a decoder bug a client's bytes reach drops it, not the run
                log.exception("%s reply of node %d could not be decoded", stage, node)
                rnd.server.reject(node, stage, f"reply could not be decoded ({type(exc).__name__}); dropped")
        return out

    def _publish(self, rnd: _Round) -> None:
        """Make the round's rejections visible in :attr:`rejections` (once)."""
        self.rejections.extend(rnd.rejections + rnd.server.rejections)
        rnd.rejections.clear()
        rnd.server.rejections.clear()

    # ------------------------------------------------------------------ aggregate: unmask

    def _masked(self, rnd: _Round, replies: Iterable[Message]) -> dict[int, MaskedReply]:
        r = rnd.params.server_round
        msgs = list(replies)
        counts = Counter(m.metadata.src_node_id for m in msgs)
        out: dict[int, MaskedReply] = {}
        for node in sorted(n for n, c in counts.items() if c > 1):
            rnd.reject(node, f"{counts[node]} final replies; which masked vector is its own is ambiguous")
        for msg in msgs:
            node = msg.metadata.src_node_id
            if counts[node] > 1:
                continue
            if msg.has_error():
                rnd.reject(node, f"client error: {msg.error.reason}")
                continue
            try:
                out[node] = from_content(msg.content, MaskedReply, stage=COLLECT_MASKED, server_round=r,
                                         source=f"final reply of node {node}")
            except MessageError as exc:
                rnd.reject(node, _hint(exc, msg))
            except Exception as exc:  # noqa: BLE001 - a decoder bug a client's bytes reach drops it, not the run
                log.exception("final reply of node %d could not be decoded", node)
                rnd.reject(node, f"final reply could not be decoded ({type(exc).__name__}); dropped")
        return out

    def drain(self, server_round: int) -> MetricRecord | None:
        """The key stages' cost of a round that will not be aggregated; None when no stage ran.

        A round refused at a key stage (``configure_train`` sent nothing), or one whose
        clients all left before their final reply, still cost the stages' messages; this
        hands them over (``secagg-bytes-*``, ``server-s``), with ``sampled`` and
        ``advertised`` (0 advertised of several sampled: no client could take part), and
        publishes the round's rejections. The round's parameters are forgotten.
        """
        rnd = self._round or self._unfinished
        self._round = self._unfinished = None
        if rnd is None or rnd.params.server_round != server_round:
            return None
        self._publish(rnd)
        return MetricRecord({**rnd.stats, "refused": 1, "clients": 0, "sampled": len(rnd.params.nodes),
                             "advertised": rnd.advertised})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd, self._round = self._round, None  # a round's parameters and grid are used once
        if rnd is None or rnd.params.server_round != server_round:
            log.warning("round %d: no secure round was configured; the global model is unchanged", server_round)
            return None, MetricRecord({"refused": 1, "clients": 0})
        params, srv, stats = rnd.params, rnd.server, rnd.stats
        masked = self._masked(rnd, replies)
        t0, wall0 = time.perf_counter(), stats["stage-wall-s"]
        try:
            consistency = srv.receive_masked(masked)
            unmask = srv.receive_consistency(self._stage(rnd, CONSISTENCY, consistency, ConsistencyReply))
            result = srv.receive_unmask(self._stage(rnd, UNMASK, unmask, UnmaskReply))
        except RoundRefused:
            result = None
        finally:
            self._publish(rnd)
        stats["server-s"] += time.perf_counter() - t0 - (stats["stage-wall-s"] - wall0)
        stats["dense-bytes"] = 4.0 * params.size * len(masked)
        if result is None:
            return None, MetricRecord({**stats, "refused": 1, "clients": 0, "advertised": len(masked)})
        mean = dequantize_mean(result.total, weight=result.weight, bits=params.bits, clip=params.clip)
        dense = scatter(mean, support=params.support, size=params.size)
        if params.support_mode == "topk":
            self._score = dense if self._score is None or self._score.size != dense.size else self._score + dense
        update = unflatten(dense, shapes={k: v.shape for k, v in rnd.current.items()})
        new = ArrayRecord({k: Array((rnd.current[k] + update[k]).astype(np.float32)) for k in sorted(update)})
        one = Message(RecordDict({ARRAYS_KEY: new, "metrics": MetricRecord({"num-examples": float(result.weight)})}),
                      dst_node_id=0, message_type=MessageType.TRAIN)
        inner = getattr(self.strategy, "rejections", None)
        before = len(inner) if isinstance(inner, list) else 0
        arrays, _ = self.strategy.aggregate_train(server_round, [one])
        if isinstance(inner, list):
            self.rejections.extend(f"round {server_round}: the wrapped strategy rejected the unmasked aggregate: {x}"
                                   for x in inner[before:])
        metrics = MetricRecord({
            **stats, "refused": 0 if arrays is not None else 1, "num-examples": float(result.weight),
            "clients": len(result.survivors), "dropped": len(params.nodes) - len(result.survivors),
            "advertised": len(masked), "quantization-step": params.clip / (max_level(params.bits) // 2),
            "support-size": len(params.support),
        })
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def check_settings(*, n: int, degree: int, threshold: int, security_bits: int, collusion: float,
                   feasible: bool = True) -> None:
    """Refuse, naming the key, the value, the minimum and the fix, settings the clients would refuse.

    ``n`` is the clients sampled per round; ``degree`` / ``threshold`` 0 are automatic;
    ``feasible``: also refuse a threshold or quorum that no round of ``n`` clients can meet.
    Raises :class:`~guardedtuning.errors.ConfigError` (a ``ValueError``).
    """
    if not 1 <= security_bits <= 256 or security_bits < SECURITY_BITS:
        raise ConfigError(f"`aggregation.security-bits` is {security_bits}, below the clients' minimum "
                          f"{SECURITY_BITS} (secagg_mod's policy; they would refuse every round); set it to "
                          f">= {SECURITY_BITS}")
    if not COLLUSION - 1e-9 <= collusion < 1:
        raise ConfigError(f"`aggregation.collusion` is {collusion}, outside [{COLLUSION:.4g}, 1): the clients assume "
                          f"up to {COLLUSION:.4g} of a round colludes and refuse less; set it in that range")
    policy = Policy(security_bits, collusion)
    why = f"for {n} clients per round at aggregation.security-bits={security_bits}, aggregation.collusion={collusion:.4g}"
    d, t, q = round_shape(n, degree=degree, threshold=threshold, security_bits=security_bits, collusion=collusion)
    d_min = min(min_degree(n, security_bits, collusion), max(n - 1, 0))
    if degree and d < d_min:
        raise ConfigError(f"`aggregation.degree` is {degree}, below the minimum {d_min} {why} (docs/threat-model.md); "
                          f"set aggregation.degree=0 (picks it) or >= {d_min}")
    _, t_auto, _ = round_shape(n, degree=d, security_bits=security_bits, collusion=collusion)
    if threshold and threshold < t_auto:
        raise ConfigError(f"`aggregation.threshold` is {threshold}, below the minimum {t_auto} for degree {d} {why} "
                          f"(t > (degree + 1) / 2, colluders holding fewer than t - 1 shares of anyone); set "
                          f"aggregation.threshold=0 (picks it) "
                          f"or >= {t_auto}")
    if t > min(n, d + 1) or q > n:
        if not feasible:
            return  # every round is skipped (logged) when it comes
        raise ConfigError(f"`aggregation.threshold` {t} (quorum {q}) exceeds what {n} clients per round with masking "
                          f"degree {d} can meet (at most {min(n, d + 1)}): every round would be refused; lower "
                          "aggregation.threshold (0 = auto) or raise federation.clients-per-round")
    problem = policy.problem(n=n, degree=d, threshold=t, quorum=q)
    if problem:
        raise ConfigError(f"aggregation.degree / aggregation.threshold: {problem}")


def _hint(exc: MessageError, reply: Message) -> str:
    """The reason a stage reply was refused; a reply with no stage record points at the missing mod."""
    if STAGE_KEY in reply.content:
        return str(exc)
    return f"{exc}; the reply has no secure-aggregation stage: is secagg_mod installed on the ClientApp " \
           "(ClientApp(mods=[secagg_mod]))?"


class SecureSparseFedAvg(SecureAggregation):
    """:class:`~guardedtuning.strategies.fedavg.AdapterFedAvg` under :class:`SecureAggregation`.

    Parameters
    ----------
    clients_per_round : int
        Clients sampled each round (all connected nodes if fewer); at least 2.
    seed : int
        Seeds client sampling and the public round seed of the support (the graph is seeded by the run id and round).
    message_type : str
        Type of the round's first message (``"train"`` or ``"train.split"``).
    **secure
        The other arguments of :class:`SecureAggregation`.
    """

    def __init__(self, *, clients_per_round: int, seed: int, message_type: str = MessageType.TRAIN,
                 **secure) -> None:  # type: ignore[no-untyped-def]
        if clients_per_round < 2:
            raise ValueError(f"`clients_per_round` must be an integer >= 2 (one client has no one to hide among) "
                             f"but is {clients_per_round}")
        super().__init__(AdapterFedAvg(clients_per_round=clients_per_round, seed=seed, message_type=message_type),
                         num_sampled_clients=clients_per_round, seed=seed, **secure)
        self.clients_per_round, self.message_type = clients_per_round, message_type

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """The round's clients: the same draw as AdapterFedAvg, so runs are comparable."""
        return self.strategy.sample(server_round, grid)  # type: ignore[attr-defined]
