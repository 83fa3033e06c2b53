"""Our own push/pull loop over the Grid, and what it measures.

``Grid.send_and_receive`` sleeps ``pull_interval`` between pulls (0.1 s for the in-memory
grid of simulations, 3 s for the HTTP grid of deployments), which would dominate a
split-learning step. :func:`exchange` pushes all of a step's messages at once and pulls
every ``comm.poll-interval`` seconds (2 ms by default) until each node has answered or
timed out; it also counts the serialised bytes each way. Where the grid's store says when a
reply arrives (Flower's simulation engine, through :data:`REPLY_STORED`), the loop wakes at
once instead of at its next poll.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from guardedtuning.wire.records import message_nbytes

REPLY_STORED = threading.Event()
"""Set whenever a reply reaches the grid's store, by whoever can see that (the simulation engine's
dispatcher: :mod:`guardedtuning.server_app.dispatch`). :func:`exchange` waits on it between pulls,
up to its ``poll``: where nothing sets it (the in-process grid, a deployment's HTTP grid), that
is the plain poll sleep."""


@dataclass
class Exchange:
    """The outcome of one push/pull of messages to a set of nodes."""

    replies: dict[int, Message] = field(default_factory=dict)  # node -> reply (may carry an error)
    timed_out: list[int] = field(default_factory=list)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0
    t_push: float = 0.0  # wall clock (time.time) when the messages were pushed
    t_done: float = 0.0  # wall clock when the last reply arrived

    def overhead_s(self, intervals: list[tuple[float, float]]) -> float:
        """Seconds of this exchange during which no client handler was running.

        ``intervals`` are the clients' (start, end) wall-clock times. What is left of
        the exchange outside their union is transport and scheduling: pushing, the
        engine's dispatch, (de)serialisation, pulling. Clients queued behind busy
        workers do not count as overhead while another client computes.
        """
        spans = sorted((max(a, self.t_push), min(b, self.t_done)) for a, b in intervals)
        busy, cur_a, cur_b = 0.0, None, None
        for a, b in spans:
            if b <= a:
                continue
            if cur_b is None or a > cur_b:
                if cur_b is not None:
                    busy += cur_b - cur_a
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        if cur_b is not None:
            busy += cur_b - cur_a
        return max(0.0, (self.t_done - self.t_push) - busy)

    def failures(self) -> dict[int, str]:
        """node -> reason, for error replies and timeouts (by node id)."""
        out = {n: f"client error: {m.error.reason}" for n, m in sorted(self.replies.items()) if m.has_error()}
        out.update({n: "no reply before comm.timeout" for n in sorted(self.timed_out)})
        return out

    def ok(self) -> dict[int, Message]:
        """node -> reply, for replies without an error, by node id (not arrival order, so
        that what the server computes from them does not depend on timing)."""
        return {n: m for n, m in sorted(self.replies.items()) if not m.has_error()}


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float, poll: float) -> Exchange:
    """Push ``messages`` (one per node), pull until all replied or ``timeout`` passed."""
    out = Exchange()
    msgs = list(messages)
    for m in msgs:
        out.bytes_down[m.metadata.dst_node_id] = message_nbytes(m)
    t0 = time.perf_counter()
    out.t_push = time.time()
    ids = list(grid.push_messages(msgs))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs, strict=True)}
    pending = set(ids)
    deadline = t0 + timeout
    while pending:
        REPLY_STORED.clear()  # before the pull: a reply stored after it sets the event again
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid not in pending:
                continue  # a duplicate or late reply: ignore
            pending.discard(mid)
            node = node_of[mid]
            out.replies[node] = reply
            if not reply.has_error():
                out.bytes_up[node] = message_nbytes(reply)
        if pending:
            if time.perf_counter() > deadline:
                out.timed_out = [node_of[mid] for mid in pending]
                break
            REPLY_STORED.wait(poll)
    out.wall_s = time.perf_counter() - t0
    out.t_done = time.time()
    return out
