"""A faster message dispatcher for Flower's simulation engine (opt-out: ``sim.dispatch-interval=0``).

In a simulation, one thread of the engine (``vce_api.add_messages_to_queue`` in Flower
1.41/1.42) moves pushed messages to the Ray workers: it sweeps all nodes, then sleeps a
fixed 100 ms. Every split-learning step waits for that sweep, 50 ms on average — more
than the step's own transport. Our own push/pull loop removes the ServerApp's 100 ms
pull sleep, but not this one, and Flower exposes no setting for it.

:func:`install` replaces that function, before the engine starts its thread, with the
same sweep, restricted to the nodes that have an undelivered message, followed by a
shorter sleep (``interval``, stretched to four times the sweep's own duration so that the
sweeps never take more than a fifth of a core). Each message is still taken from the
state exactly once, by one thread, through Flower's own ``get_message_ins``. If the
engine's thread is already running (it starts after Ray is up, seconds after the
ServerApp loads, so this is not expected) nothing is changed and the status says so;
every run reports the status in ``results.json`` (``cost.dispatch``).

The sweeps also wake at once on a push instead of at their next interval, and the ServerApp's
pull loop wakes at once on a reply (:data:`guardedtuning.wire.exchange.REPLY_STORED`): the
dispatcher wraps the engine's link state's ``store_message_ins`` and ``store_message_res``
(instance attributes of that one object: the same store, the same calls, plus an event set
after each), so no step waits for the rest of a sleep (on average half an interval, each way,
and a nice-19 process's wake-up on a loaded CPU).

Flower's function is reached through :mod:`guardedtuning.compat`: with its gate off (an
untested Flower, or ``GUARDEDTUNING_FLOWER_COMPAT=off``) nothing is patched and the
status is ``"flower (<why>)"``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from guardedtuning import compat
from guardedtuning.wire.exchange import REPLY_STORED

ENGINE_DISPATCHER = "vce.add_messages_to_queue"  # compat.FLOWER_PRIVATE name of Flower's function


def nodes_with_pending_messages(state: Any, nodes_mapping: Any) -> Any:
    """The nodes worth asking ``state.get_message_ins``: those with an undelivered message.

    ``get_message_ins`` checks every stored message (expiry, federation) for every node it
    is asked about, which costs about a millisecond per sweep with a few messages in
    flight: at a 2 ms interval that would take half a core from the clients. A glance at
    the in-memory store (``InMemoryLinkState.message_ins_store``, a private attribute of
    Flower's) finds the few nodes that have something to deliver; the delivery itself, and
    its checks, stay Flower's. Other state backends get the full sweep.
    """
    store = getattr(state, compat.MESSAGE_INS_STORE, None)
    if not isinstance(store, dict):
        return nodes_mapping.keys()
    pending = {m.metadata.dst_node_id for m in list(store.values()) if not m.metadata.delivered_at}
    return [n for n in pending if n in nodes_mapping]


PUSHED = threading.Event()
"""Set after each message the ServerApp stores for the engine (once :func:`signal_stores` wrapped the state)."""


def signal_stores(state: Any) -> None:
    """Make ``state`` set :data:`PUSHED` after each ``store_message_ins`` and :data:`REPLY_STORED` after each
    ``store_message_res`` (the engine's reply thread's call); wrapping twice is a no-op."""
    if getattr(state, "guardedtuning_signals", False):
        return

    def signalling(method: Any, event: threading.Event) -> Any:
        def store(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:
                event.set()
        return store

    for name, event in (("store_message_ins", PUSHED), ("store_message_res", REPLY_STORED)):
        if callable(getattr(state, name, None)):  # a backend without it keeps the plain interval
            setattr(state, name, signalling(getattr(state, name), event))
    state.guardedtuning_signals = True


def install(interval: float) -> str:
    """Install the faster dispatcher; return what happened, for the results record."""
    if interval <= 0:
        return "flower (sim.dispatch-interval=0)"
    g = compat.gate()
    if not g.enabled:
        return g.stock
    try:
        current = compat.private(ENGINE_DISPATCHER)
    except compat.FlowerCompatError:
        return "flower (engine module not found)"
    if getattr(current, "guardedtuning_interval", None) is not None:
        return f"fast ({current.guardedtuning_interval * 1000:g} ms)"
    if any(getattr(t, "_target", None) is current for t in threading.enumerate()):
        return "flower (the engine's dispatcher was already running)"

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        """Flower's sweep (one message per node per sweep), then a short sleep that a push cuts short."""
        signal_stores(state)
        while not f_stop.is_set():
            PUSHED.clear()  # before the sweep: a push during it wakes the next one at once
            t0 = time.perf_counter()
            for node_id in nodes_with_pending_messages(state, nodes_mapping):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            # at most a fifth of a core for the sweeps, however many nodes there are (pushes aside)
            PUSHED.wait(max(interval, 4 * (time.perf_counter() - t0)))

    add_messages_to_queue.guardedtuning_interval = interval  # type: ignore[attr-defined]
    compat.replace(ENGINE_DISPATCHER, add_messages_to_queue)
    return f"fast ({interval * 1000:g} ms)"
