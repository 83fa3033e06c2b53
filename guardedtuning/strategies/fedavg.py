"""Weighted averaging of adapter updates, with every reply checked before it is used.

The seam every federated recipe aggregates through, and a Flower ``Strategy`` in its own
right (``Strategy.start()`` works): ``configure_train`` samples the round's clients
(seeded), builds their first message and remembers the global arrays it sent;
``aggregate_train`` turns the clients' final replies into the *new global arrays*
(sent arrays plus the example-weighted mean update), as Flower's ``FedAvg`` does.

A reply carries either ``update`` (an adapter delta, local minus global: our handlers)
or ``arrays`` (the client's new weights: a plain Flower ClientApp; its update is
``arrays`` minus what was sent), and ``metrics`` with ``num-examples``. A reply is
rejected, with the reason logged and counted, when it is an error, comes twice from one
node, carries neither record, lacks ``metrics``, or holds a tensor with the wrong name,
shape or dtype, or a NaN, or a value that would leave float32's range once added to the
global arrays (a float64 1e300, say); the rest of the round goes on. A reply's weight is
its ``num-examples`` capped at ``max_weight`` (``aggregation.max-weight``, as under secure
aggregation), so no client can make the mean its own update by claiming a huge count.
Since the new global arrays are a convex combination of the accepted clients' ``global +
update``, each of them finite in float32, the aggregate is finite too.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from guardedtuning.errors import MessageError
from guardedtuning.wire.records import get_record, metric_value

log = logging.getLogger(__name__)

UPDATE_KEY = "update"
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
WEIGHT_KEY = "num-examples"


def seeded_sample(grid: Grid, k: int, *, seed: int, server_round: int) -> list[int]:
    """The round's clients: ``k`` of the connected nodes (all if fewer), seeded by run and round.

    Every strategy samples with this, so runs that differ only in aggregation see the same
    clients in the same rounds.
    """
    nodes = sorted(grid.get_node_ids())
    return sorted(random.Random(seed * 100_003 + server_round).sample(nodes, min(k, len(nodes))))


class AdapterFedAvg(Strategy):
    """FedAvg over adapter updates, weighted by each client's example count.

    Parameters
    ----------
    clients_per_round : int
        Clients sampled each round (all connected nodes if fewer are connected).
    seed : int
        Seeds the client sampling, so a run samples the same clients when repeated.
    message_type : str
        Type of the first message of a round: ``"train"`` (local training) or
        ``"train.split"`` (the first step of split learning).
    max_weight : float
        Cap on one reply's weight (its ``num-examples``): ``aggregation.max-weight``.
    """

    def __init__(self, *, clients_per_round: int, seed: int, message_type: str = MessageType.TRAIN,
                 max_weight: float = 1024) -> None:
        if clients_per_round < 1:
            raise ValueError(f"`clients_per_round` must be a positive integer but is {clients_per_round}")
        if not max_weight >= 1:
            raise ValueError(f"`max_weight` must be >= 1 but is {max_weight}; set aggregation.max-weight to a "
                             "positive integer")
        self.max_weight = float(max_weight)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.message_type = message_type
        self.rejections: list[str] = []
        self._expected: dict[str, tuple[int, ...]] = {}
        self._current: dict[str, np.ndarray] = {}  # the global arrays sent in configure_train

    def summary(self) -> None:
        log.info("AdapterFedAvg: %d clients per round, message type %s", self.clients_per_round, self.message_type)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        return seeded_sample(grid, self.clients_per_round, seed=self.seed, server_round=server_round)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}
        self._expected = {k: v.shape for k, v in self._current.items()}
        config["server-round"] = server_round
        content = RecordDict({ARRAYS_KEY: arrays, "config": config})
        return [Message(content=content, message_type=self.message_type, dst_node_id=n)
                for n in self.sample(server_round, grid)]

    def check_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], float, MetricRecord]:
        """The reply's update (``update``, or ``arrays`` minus the sent global), weight and metrics.

        The weight is ``num-examples`` capped at :attr:`max_weight`; the update is float64,
        finite, and ``global + update`` is finite in float32.

        Raises
        ------
        MessageError
            When the reply is an error or malformed (the reason names what is wrong).
        """
        node = msg.metadata.src_node_id
        source = f"reply of node {node}"
        if msg.has_error():
            raise MessageError(f"{source}: client error: {msg.error.reason}")
        if UPDATE_KEY not in msg.content and ARRAYS_KEY not in msg.content:
            raise MessageError(f"{source}: carries neither {UPDATE_KEY!r} (an adapter update) nor {ARRAYS_KEY!r} "
                               "(the client's new weights); the ClientApp sends one of them")
        is_update = UPDATE_KEY in msg.content
        key = UPDATE_KEY if is_update else ARRAYS_KEY
        update = get_record(msg.content, key, ArrayRecord, source=source, sender="ClientApp")
        metrics = get_record(msg.content, METRICS_KEY, MetricRecord, source=source, sender="ClientApp")
        weight = metric_value(metrics, WEIGHT_KEY, source=source)
        if weight <= 0:
            raise MessageError(f"{source}: {WEIGHT_KEY} is {weight}, expected > 0")
        weight = min(weight, self.max_weight)  # aggregation.max-weight
        keys = set(update.keys())
        if keys != set(self._expected):
            raise MessageError(f"{source}: {key} tensors {sorted(keys ^ set(self._expected))[:3]} "
                               "do not match the global adapter")
        arrays: dict[str, np.ndarray] = {}
        for k, shape in self._expected.items():
            arr = update[k].numpy()
            if arr.dtype.kind != "f":
                raise MessageError(f"{source}: {key} {k!r} has dtype {arr.dtype}, expected float")
            if tuple(arr.shape) != shape:
                raise MessageError(f"{source}: {key} {k!r} has shape {arr.shape}, expected {shape}")
            if not np.isfinite(arr).all():
                raise MessageError(f"{source}: {key} {k!r} holds NaN or inf")
            arrays[k] = arr.astype(np.float64) if is_update else arr.astype(np.float64) - self._current[k]
            with np.errstate(over="ignore", invalid="ignore"):
                finite = np.isfinite(arrays[k]).all() and np.isfinite((self._current[k] + arrays[k])
                                                                      .astype(np.float32)).all()
            if not finite:
                raise MessageError(f"{source}: {key} {k!r} holds values beyond float32's range (largest "
                                   f"|value| {float(np.max(np.abs(arr))):.3g}); updates must be float32-finite")
        return arrays, weight, metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global arrays (sent global + weighted mean update) and the round's metrics.

        ``None, None`` when no reply is valid: the global model stays as it is.
        """
        accepted: list[tuple[dict[str, np.ndarray], float, MetricRecord]] = []
        seen: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if node in seen:
                    raise MessageError(f"reply of node {node}: a second reply in round {server_round}")
                seen.add(node)
                accepted.append(self.check_reply(msg))
            except MessageError as exc:
                self.rejections.append(str(exc))
                log.warning("round %d: rejected %s", server_round, exc)
        if not accepted:
            return None, None
        total = sum(w for _, w, _ in accepted)
        avg = {k: sum(a[k] * (w / total) for a, w, _ in accepted) for k in self._expected}
        new = {k: (self._current[k] + v).astype(np.float32) for k, v in avg.items()}
        if not all(np.isfinite(v).all() for v in new.values()):  # cannot happen (convex combination): a guard
            self.rejections.append(f"round {server_round}: the aggregate is non-finite; the global model stays")
            log.warning("round %d: %s", server_round, self.rejections[-1])
            return None, None
        out = ArrayRecord({k: Array(v) for k, v in new.items()})
        metrics = MetricRecord({WEIGHT_KEY: total, "clients": len(accepted)})
        return out, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # utility is measured centrally, on the assembled model

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
