"""Secure aggregation of sparse, quantized adapter updates: the Message-API strategy.

Same seam as :class:`~guardedtuning.strategies.fedavg.AdapterFedAvg`:

- ``configure_train`` samples the round's clients and builds their first message: the
  global adapters (``arrays``, optionally quantized, see ``downlink_bits``), the driver's
  ``config``, and the round's public secure-aggregation parameters (``secagg`` and
  ``secagg-setup``, see :class:`~guardedtuning.strategies.secagg.params.RoundParams`);
- the driver runs the round's training messages as it does for FedAvg; a client's final
  reply carries, instead of its update, its ``advertise`` payload (two public keys), made
  by :func:`guardedtuning.clients.secagg_handlers.seal_update`, which keeps the
  compressed update in the client's ``context.state``;
- ``aggregate_train(server_round, replies)`` takes those final replies and runs the three
  remaining stages itself (``share-keys``, ``collect-masked``, ``unmask``; message type
  ``train.secagg``) through the grid it got in ``configure_train``, with
  :func:`guardedtuning.wire.exchange.exchange`. It returns the weighted mean
  update (dense, zero off the support) as an ArrayRecord, or ``None`` when the round is
  refused (fewer than ``threshold`` clients or shares left; masks that did not cancel),
  in which case the global model must stay unchanged.

Bytes: the returned MetricRecord holds ``secagg-bytes-up`` / ``secagg-bytes-down``, the
serialized size of the stage messages (the driver counts the first message and the
final reply itself), and ``dense-bytes``, what the same clients' dense fp32 updates
would have taken.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from guardedtuning.codecs import (
    dequantize_mean,
    encode_downlink,
    max_level,
    rand_k_support,
    scatter,
    support_size,
    top_k_support,
    unflatten,
)
from guardedtuning.errors import MessageError
from guardedtuning.strategies.fedavg import seeded_sample
from guardedtuning.strategies.secagg.graph import auto_threshold, effective_degree
from guardedtuning.strategies.secagg.masking import PACKINGS, field_bits
from guardedtuning.strategies.secagg.params import CONFIG_KEY, SETUP_KEY, SUPPORTS, RoundParams
from guardedtuning.strategies.secagg.server import RoundRefused, ServerSecAgg
from guardedtuning.strategies.secagg.wire import (
    ADVERTISE,
    COLLECT_MASKED,
    SHARE_KEYS,
    UNMASK,
    Advertise,
    MaskedReply,
    SharesReply,
    UnmaskReply,
    from_content,
    to_content,
)
from guardedtuning.wire.exchange import exchange

log = logging.getLogger(__name__)

STAGE_MESSAGE_TYPE = "train.secagg"
CODEC_KEY = "arrays-codec"


class SecureSparseFedAvg(Strategy):
    """Weighted FedAvg of sparse, quantized, securely aggregated adapter updates.

    Parameters
    ----------
    clients_per_round : int
        Clients sampled each round (all connected nodes if fewer).
    seed : int
        Seeds client sampling and the public round seed (support, graph).
    message_type : str
        Type of the round's first message (``"train"`` or ``"train.split"``).
    density : float
        Fraction of the adapter's coordinates sent each round, in (0, 1].
    bits : int
        Bits per sent value, in [2, 32].
    clip : float
        Quantization range ``[-clip, clip]`` of the sent values (after error feedback).
    support : str
        ``"rand"`` (rand-k from the round seed) or ``"topk"`` (top-k of the accumulated
        public aggregate, with ``explore`` of the k drawn at random).
    explore : float
        Random fraction of a top-k support, in [0, 1].
    degree : int
        Neighbours per client in the masking graph; 0 picks ``O(log n)``; ``>= n - 1`` is
        the complete graph (plain SecAgg).
    threshold : int
        Shares needed to reconstruct a secret and the fewest survivors a round accepts;
        0 picks a strict majority of ``degree + 1``. At least 2.
    max_weight : int
        Cap on a client's weight (its example count). The field needs
        ``bit_length(clients_per_round * max_weight * (2**bits - 2))`` bits, at most 64.
    norm_clip : float
        L2 clip of each client's sent values before quantization, for central DP (0: off).
        With central DP use ``max_weight=1``: a weight multiplies a client's contribution.
    packing : str
        ``"bits"``: masked values bit-packed, exactly ``m`` bits each (smallest);
        ``"word"``: as the smallest uint word holding ``m`` bits (uint8/16/32/64).
    downlink_bits : int
        Quantize the global adapters sent to clients to this many bits (0: send fp32).
    timeout, poll : float
        Per-stage reply timeout and pull interval in seconds (``comm.timeout``,
        ``comm.poll-interval``).
    """

    def __init__(
        self, *, clients_per_round: int, seed: int, message_type: str = MessageType.TRAIN, density: float = 0.05,
        bits: int = 8, clip: float = 0.05, support: str = "rand", explore: float = 0.5, degree: int = 0,
        threshold: int = 0, max_weight: int = 1024, norm_clip: float = 0.0, packing: str = "bits",
        downlink_bits: int = 0, timeout: float = 600.0, poll: float = 0.002,
    ) -> None:
        checks = (
            ("clients_per_round", clients_per_round, clients_per_round >= 2, "an integer >= 2 (one client has no one "
                                                                           "to hide among)"),
            ("density", density, 0 < density <= 1, "a number in (0, 1]"),
            ("bits", bits, 2 <= bits <= 32, "an integer in [2, 32]"),
            ("clip", clip, clip > 0, "a positive number"),
            ("support", support, support in SUPPORTS, f"one of {SUPPORTS}"),
            ("explore", explore, 0 <= explore <= 1, "a number in [0, 1]"),
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
        field_bits(clients=clients_per_round, bits=bits, max_weight=max_weight)  # raises if over 64 bits
        self.clients_per_round, self.seed, self.message_type = clients_per_round, seed, message_type
        self.density, self.bits, self.clip, self.support, self.explore = density, bits, clip, support, explore
        self.degree, self.threshold, self.max_weight, self.norm_clip = degree, threshold, max_weight, norm_clip
        self.packing, self.downlink_bits, self.timeout, self.poll = packing, downlink_bits, timeout, poll
        self.rejections: list[str] = []
        self._grid: Grid | None = None
        self._params: RoundParams | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._current: dict[str, np.ndarray] = {}
        self._score: np.ndarray | None = None  # accumulated public aggregates (top-k support)

    def summary(self) -> None:
        log.info("SecureSparseFedAvg: %d clients per round, density %s, %d bits, clip %s, support %s, degree %s, "
                 "threshold %s", self.clients_per_round, self.density, self.bits, self.clip, self.support,
                 self.degree or "auto", self.threshold or "auto")

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """The round's clients: the same draw as AdapterFedAvg, so runs are comparable."""
        return seeded_sample(grid, self.clients_per_round, seed=self.seed, server_round=server_round)

    def round_seed(self, server_round: int) -> bytes:
        """The public 256-bit seed of a round (support, graph)."""
        return hashlib.sha256(b"gt-secagg/round/" + self.seed.to_bytes(8, "little", signed=True)
                              + server_round.to_bytes(8, "little")).digest()

    def round_params(self, server_round: int, nodes: list[int], size: int) -> RoundParams | None:
        """The round's public parameters, or None (logged) when the round cannot be secure."""
        n = len(nodes)
        degree = effective_degree(n, self.degree)
        t = self.threshold or auto_threshold(degree)
        if n < 2 or t > degree + 1:
            log.warning("round %d skipped: %d clients, degree %d, threshold %d; secure aggregation needs at least "
                        "threshold <= degree + 1 and 2 clients (lower aggregation.threshold or connect more clients)",
                        server_round, n, degree, t)
            return None
        seed = self.round_seed(server_round)
        if self.support == "topk":
            score = self._score if self._score is not None and self._score.size == size else np.zeros(size)
            sup = top_k_support(score=score, density=self.density, explore=self.explore, seed=seed)
        else:
            sup = rand_k_support(size=size, density=self.density, seed=seed)
        return RoundParams(server_round=server_round, nodes=tuple(nodes), degree=degree, threshold=t, size=size,
                           density=self.density, support_mode=self.support, support=sup, bits=self.bits,
                           clip=self.clip, norm_clip=self.norm_clip, max_weight=self.max_weight,
                           packing=self.packing, seed=seed)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._grid = grid
        self._shapes = {k: tuple(arrays[k].shape) for k in arrays.keys()}
        self._current = {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}
        size = int(sum(np.prod(s, dtype=np.int64) for s in self._shapes.values()))
        self._params = self.round_params(server_round, self.sample(server_round, grid), size)
        if self._params is None:
            return []
        config["server-round"] = server_round
        sa_cfg, sa_setup = self._params.to_records()
        records: dict[str, ArrayRecord | ConfigRecord] = {"arrays": arrays, "config": config, CONFIG_KEY: sa_cfg,
                                                          SETUP_KEY: sa_setup}
        if self.downlink_bits:
            levels, scales = encode_downlink({k: arrays[k].numpy() for k in arrays.keys()}, bits=self.downlink_bits)
            names = sorted(levels)
            records["arrays"] = ArrayRecord({k: Array(levels[k]) for k in names})
            records[CODEC_KEY] = ConfigRecord({"bits": self.downlink_bits, "names": names,
                                               "scales": [scales[k] for k in names]})
        return [Message(content=RecordDict(dict(records)), message_type=self.message_type, dst_node_id=n)
                for n in self._params.nodes]

    # ------------------------------------------------------------------ aggregation

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        msg = f"round {server_round}: node {node} rejected: {reason}"
        self.rejections.append(msg)
        log.warning("%s", msg)

    def _advertised(self, server_round: int, replies: Iterable[Message]) -> dict[int, Advertise]:
        msgs = list(replies)
        counts = Counter(m.metadata.src_node_id for m in msgs)
        out: dict[int, Advertise] = {}
        for node in sorted(n for n, c in counts.items() if c > 1):
            self._reject(server_round, node, f"{counts[node]} final replies; which keys are its own is ambiguous")
        for msg in msgs:
            node = msg.metadata.src_node_id
            if counts[node] > 1:
                continue
            if msg.has_error():
                self._reject(server_round, node, f"client error: {msg.error.reason}")
                continue
            try:
                out[node] = from_content(msg.content, Advertise, stage=ADVERTISE, server_round=server_round,
                                         source=f"final reply of node {node}")
            except MessageError as exc:
                self._reject(server_round, node, str(exc))
        return out

    def _stage(self, srv: ServerSecAgg, stage: str, requests: dict, kind: type, stats: dict[str, float]) -> dict:
        """Push one stage's requests, pull and decode the replies; lost or bad ones are logged."""
        if self._grid is None:
            raise RuntimeError("aggregate_train ran before configure_train; call configure_train first")
        r = srv.params.server_round
        msgs = [Message(content=to_content(req, stage=stage, server_round=r), message_type=STAGE_MESSAGE_TYPE,
                        dst_node_id=node) for node, req in requests.items()]
        ex = exchange(self._grid, msgs, timeout=self.timeout, poll=self.poll)
        stats["secagg-bytes-down"] += sum(ex.bytes_down.values())
        stats["secagg-bytes-up"] += sum(ex.bytes_up.values())
        stats["stage-wall-s"] += ex.wall_s
        for node, reason in sorted(ex.failures().items()):
            self._reject(r, node, f"dropped at {stage}: {reason}")
        out = {}
        for node, msg in ex.ok().items():
            try:
                out[node] = from_content(msg.content, kind, stage=stage, server_round=r,
                                         source=f"{stage} reply of node {node}")
            except MessageError as exc:
                srv.reject(node, stage, str(exc))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        params = self._params
        stats = {"secagg-bytes-down": 0.0, "secagg-bytes-up": 0.0, "stage-wall-s": 0.0}
        if params is None or params.server_round != server_round:
            log.warning("round %d: no secure round was configured; the global model is unchanged", server_round)
            return None, MetricRecord({"refused": 1, "clients": 0})
        srv = ServerSecAgg(params)
        adverts = self._advertised(server_round, replies)
        t0 = time.perf_counter()
        try:
            keys = srv.receive_advertise(adverts)
            masks = srv.receive_shares(self._stage(srv, SHARE_KEYS, keys, SharesReply, stats))
            unmask = srv.receive_masked(self._stage(srv, COLLECT_MASKED, masks, MaskedReply, stats))
            result = srv.receive_unmask(self._stage(srv, UNMASK, unmask, UnmaskReply, stats))
        except RoundRefused:
            result = None
        finally:
            self.rejections.extend(srv.rejections)
            self._params = None  # a round's parameters are used once
        stats["server-s"] = time.perf_counter() - t0 - stats["stage-wall-s"]
        stats["dense-bytes"] = 4.0 * params.size * len(adverts)
        if result is None:
            return None, MetricRecord({**stats, "refused": 1, "clients": 0, "advertised": len(adverts)})
        mean = dequantize_mean(result.total, weight=result.weight, bits=params.bits, clip=params.clip)
        dense = scatter(mean, support=params.support, size=params.size)
        if params.support_mode == "topk":
            self._score = dense if self._score is None or self._score.size != dense.size else self._score + dense
        update = unflatten(dense, shapes=self._shapes)
        out = ArrayRecord({k: Array((self._current[k] + v).astype(np.float32)) for k, v in update.items()})
        metrics = MetricRecord({
            **stats, "refused": 0, "num-examples": float(result.weight), "clients": len(result.survivors),
            "dropped": len(params.nodes) - len(result.survivors), "advertised": len(adverts),
            "quantization-step": params.clip / (max_level(params.bits) // 2),
            "support-size": support_size(size=params.size, density=params.density),
        })
        return out, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # utility is measured centrally, on the assembled model

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
