"""Run a federated recipe in this process: the real ServerApp and ClientApp, no SuperLink, Ray or sockets.

A sweep's points cost what their computation costs, not a SuperLink, a Ray runtime and a
``flwr run`` each (about 30 s a point on the 2-core CPU). :class:`InProcessGrid` is a Flower
``Grid`` that delivers each pushed message to the destination node's ClientApp at once, the
way Flower's simulation engine does (one ``Context`` per node, kept between messages, with
``partition-id``/``num-partitions`` in its node config; an exception in the ClientApp becomes
an error reply; every reply gets a message id), so the server's round engine, the drivers,
the strategies with their secure-aggregation stages, the client handlers and the secagg mod
all run unchanged. Each message's content crosses as its protobuf (Flower's own serialisation)
and its metadata as a copy, so neither side ever holds the other's objects, as on a wire. What differs from ``guardedtuning run``:
the clients run one after another in this process (Flower's simulation runs as many at once
as ``sim.num-cpus`` allows), so a push returns when every client has answered and
``comm.timeout`` never drops a slow one; and the node ids are drawn from the run's seed
instead of at random. The ids decide which partitions the strategy samples in a round (it
samples positions among the sorted ids), so with fewer clients per round than clients an
in-process run trains other partitions than a given Flower run, as two Flower runs do (the
server's top takes the clients' rows in an order of their content, not of the ids:
:func:`guardedtuning.training.canonical_order`); byte counts (of the serialised messages,
:func:`guardedtuning.wire.records.message_nbytes`) differ by the few bytes the ids' varints take. ``tests/test_inprocess.py`` checks that a
run gives the record Flower's simulation engine gives.
"""

from __future__ import annotations

import copy
import random
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from guardedtuning import compat
from guardedtuning.config import RunConfig
from guardedtuning.launcher import OutputLock

RUN_ID = 1
"""The run id every in-process run carries (the secure aggregation binds its rounds to it)."""

SERVER_NODE_ID = 1
"""The server's node id in the task identity (Flower's ``SUPERLINK_NODE_ID``)."""


def node_ids(num_nodes: int, seed: int) -> list[int]:
    """``num_nodes`` distinct 64-bit node ids drawn from ``seed`` (Flower draws them at random, 64-bit too)."""
    rng = random.Random(f"guardedtuning/inprocess/nodes/{seed}")
    ids: list[int] = []
    while len(ids) < num_nodes:
        n = rng.getrandbits(64)
        if n not in ids and n != SERVER_NODE_ID:
            ids.append(n)
    return ids


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    app
        The ClientApp (``guardedtuning.clients.client_app.app``).
    num_nodes
        How many nodes; node ``i`` holds partition ``i`` of ``num_nodes``.
    run_config
        The flat run config each node's ``Context`` carries.
    seed
        Draws the node ids (:func:`node_ids`).
    """

    def __init__(self, app: ClientApp, num_nodes: int, run_config: dict[str, Any], *, seed: int = 0) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes is {num_nodes}; an in-process federation needs at least 1 node")
        set_task_identity()
        self.app = app
        self.node_ids = node_ids(num_nodes, seed)
        self.contexts = {
            n: Context(run_id=RUN_ID, node_id=n, node_config={"partition-id": i, "num-partitions": num_nodes},
                       state=RecordDict(), run_config=dict(run_config))
            for i, n in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def deliver(self, node: int, message: Message) -> Message | None:
        """The node's reply to ``message``: the ClientApp's, or an error reply if it raised.

        As Flower's simulation engine: the ClientApp works on a copy of the node's ``Context``,
        kept only when it answers (a call that raised leaves the node's state as it was), and an
        exception becomes an error reply with Flower's code and reason format.
        """
        ctx = self.contexts[node]
        work = Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=dict(ctx.node_config),
                       state=records_copy(ctx.state), run_config=dict(ctx.run_config))
        try:
            reply = self.app(message, work)
        except Exception as exc:  # noqa: BLE001 - Flower's simulation engine turns any exception into an error reply
            code = int(compat.private("ErrorCode").CLIENT_APP_RAISED_EXCEPTION)
            return Message(Error(code=code, reason=f"{type(exc)}:<'{exc}'>"), reply_to=message)
        self.contexts[node] = work
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                raise ValueError(f"a message for node {node}, which is not in this in-process federation "
                                 f"({len(self.node_ids)} nodes)")
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid  # as Flower's grids do when they push
            reply = self.deliver(node, wire_copy(msg))  # the client gets its own copy, as over a wire
            if reply is not None:
                reply = wire_copy(reply)
                reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def records_copy(records: RecordDict) -> RecordDict:
    """A copy of ``records`` that shares nothing with it, through Flower's protobuf."""
    wire = compat.private("recorddict_to_proto")(records).SerializeToString()
    return compat.private("recorddict_from_proto")(compat.private("ProtoRecordDict").FromString(wire))


def wire_copy(message: Message) -> Message:
    """A copy of ``message`` that shares nothing with it: the content through Flower's protobuf, the metadata copied."""
    meta = copy.deepcopy(message.metadata)
    if message.has_error():
        return Message(Error(code=message.error.code, reason=message.error.reason), metadata=meta)
    return Message(content=records_copy(message.content), metadata=meta)


def set_task_identity() -> None:
    """Flower's ``Message`` reads the process's task identity (run and node id): set the server's."""
    task = compat.private("TaskIdentity")
    task.task_id = 1
    task.run_id = RUN_ID
    task.node_id = SERVER_NODE_ID


def run_in_process(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` (any recipe) in this process and return its results record.

    The checks of ``guardedtuning run`` (:func:`guardedtuning.preflight.preflight`) run first,
    and the output folder's lock is held as ``guardedtuning run`` holds it (a live run in the
    same folder is refused by PID); then the ServerApp's :func:`~guardedtuning.server_app.server_app.execute` with an
    :class:`InProcessGrid` of ``federation.num-clients`` nodes running the ClientApp.
    """
    from guardedtuning import recipes
    from guardedtuning.clients.client_app import app as client_app
    from guardedtuning.preflight import preflight
    from guardedtuning.server_app.server_app import execute

    preflight(cfg)
    lock = OutputLock(Path(cfg.output.dir))  # one live run per output folder, as `guardedtuning run`
    lock.acquire()
    try:
        if not recipes.get(cfg.recipe).federated:
            return execute(cfg, None)
        grid = InProcessGrid(client_app, cfg.federation.num_clients, cfg.flat(), seed=cfg.seed)
        return execute(cfg, grid, dispatch="in-process")
    finally:
        lock.release()
