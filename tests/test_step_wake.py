"""Split step overhead (issue 15, item 3): the engine's dispatcher and the ServerApp's pull loop wake on the
store's pushes and replies, not at their next poll.

Each test sets a poll far longer than its bound (30 s against 10 s), so it fails on a loop that sleeps its
whole poll (the code before) and cannot fail on a slow machine that wakes at all.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from guardedtuning import compat
from guardedtuning.server_app import dispatch
from guardedtuning.wire import exchange as wire_exchange

vce_api = compat.owner(dispatch.ENGINE_DISPATCHER)
LONG = 30.0  # a poll / dispatch interval no test waits for
BOUND = 10.0


@pytest.fixture(autouse=True)
def _gate_on(monkeypatch):
    monkeypatch.delenv(compat.ENV_VAR, raising=False)


class Store:
    """A link state's two store calls and the dispatcher's read, over plain lists."""

    def __init__(self):
        self.ins: dict[int, list[str]] = {}
        self.res: list[object] = []
        self.lock = threading.Lock()

    def store_message_ins(self, message):
        with self.lock:
            self.ins.setdefault(message[0], []).append(message[1])
        return message[1]

    def get_message_ins(self, node_id, limit):
        with self.lock:
            msgs = self.ins.get(node_id, [])
            out, self.ins[node_id] = msgs[:limit], msgs[limit:]
            return out

    def store_message_res(self, message):
        with self.lock:
            self.res.append(message)
        return "id"


def test_the_dispatcher_delivers_a_push_at_once_not_at_its_next_sweep(monkeypatch):
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    assert dispatch.install(LONG) == f"fast ({LONG * 1000:g} ms)"
    state, q, stop = Store(), queue.Queue(), threading.Event()
    t = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, q, {1: 0, 2: 1}, stop), daemon=True)
    t.start()
    try:
        time.sleep(0.2)  # the first sweep found nothing; the dispatcher now waits up to LONG
        t0 = time.perf_counter()
        state.store_message_ins((2, "m"))  # what the ServerApp's grid calls when it pushes
        assert q.get(timeout=BOUND) == "m"
        assert time.perf_counter() - t0 < BOUND
        state.store_message_ins((1, "a"))
        assert q.get(timeout=BOUND) == "a" and q.empty()  # each delivered once
    finally:
        stop.set()
        dispatch.PUSHED.set()
        t.join(timeout=BOUND)
    assert not t.is_alive()


def test_signal_stores_wraps_once_and_keeps_the_store_s_answers():
    state = Store()
    dispatch.signal_stores(state)
    wrapped = state.store_message_res
    dispatch.signal_stores(state)
    assert state.store_message_res is wrapped  # not wrapped twice
    wire_exchange.REPLY_STORED.clear()
    assert state.store_message_res("r") == "id" and state.res == ["r"]
    assert wire_exchange.REPLY_STORED.is_set()
    dispatch.signal_stores(object.__new__(type("Bare", (), {})))  # a backend without the calls: nothing to wrap


def test_the_pull_loop_takes_a_reply_when_it_is_stored_not_at_its_next_poll():
    from types import SimpleNamespace as NS

    state = Store()
    dispatch.signal_stores(state)  # as the engine's dispatcher does to the engine's state

    class Grid:
        """Flower's in-memory grid over ``state``: the reply thread stores, the pull reads."""

        def push_messages(self, msgs):
            threading.Timer(0.3, lambda: state.store_message_res(reply)).start()  # the engine's reply thread
            return ["mid"]

        def pull_messages(self, ids):
            with state.lock:
                out, state.res[:] = list(state.res), []
            return out

    reply = NS(metadata=NS(reply_to_message_id="mid"), has_error=lambda: True)  # an error reply: no byte count
    msg = NS(metadata=NS(dst_node_id=5))
    real = wire_exchange.message_nbytes
    wire_exchange.message_nbytes = lambda m: 0
    try:
        ex = wire_exchange.exchange(Grid(), [msg], timeout=2 * LONG, poll=LONG)
    finally:
        wire_exchange.message_nbytes = real
    assert ex.replies == {5: reply} and not ex.timed_out
    assert ex.wall_s < BOUND
