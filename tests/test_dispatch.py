from __future__ import annotations

import queue
import threading

import pytest

from guardedtuning import compat
from guardedtuning.server_app import dispatch
from guardedtuning.server_app.dispatch import ENGINE_DISPATCHER, install

vce_api = compat.owner(ENGINE_DISPATCHER)  # Flower's simulation engine module


@pytest.fixture(autouse=True)
def _gate_on(monkeypatch):
    monkeypatch.delenv(compat.ENV_VAR, raising=False)


def test_install_replaces_the_engine_dispatcher_once(monkeypatch):
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    assert install(0.0).startswith("flower")
    assert install(0.002) == "fast (2 ms)"
    assert vce_api.add_messages_to_queue.guardedtuning_interval == 0.002
    assert install(0.005) == "fast (2 ms)"  # already installed: unchanged


def test_refuses_when_the_engine_thread_already_runs(monkeypatch):
    original = vce_api.add_messages_to_queue
    monkeypatch.setattr(vce_api, "add_messages_to_queue", original)
    stop = threading.Event()

    class State:
        def get_message_ins(self, node_id, limit):
            return []

    t = threading.Thread(target=original, args=(State(), queue.Queue(), {1: 0}, stop))
    t.start()
    try:
        assert install(0.002) == "flower (the engine's dispatcher was already running)"
        assert vce_api.add_messages_to_queue is original
    finally:
        stop.set()
        t.join()


def test_fast_dispatcher_delivers_each_message_once_and_quickly(monkeypatch):
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    install(0.002)
    fast = vce_api.add_messages_to_queue

    class State:
        def __init__(self):
            self.pending = {1: ["a", "b"], 2: ["c"]}
            self.lock = threading.Lock()

        def get_message_ins(self, node_id, limit):
            with self.lock:
                msgs = self.pending.get(node_id, [])
                out, self.pending[node_id] = msgs[:limit], msgs[limit:]
                return out

    class Stop(threading.Event):
        waits: list[float] = []

        def wait(self, timeout=None):
            self.waits.append(timeout)
            return super().wait(timeout)

    state, q, stop = State(), queue.Queue(), threading.Event()
    monkeypatch.setattr(dispatch, "PUSHED", Stop())  # between sweeps it waits on a push, up to the interval
    t = threading.Thread(target=fast, args=(state, q, {1: 0, 2: 1}, stop))
    t.start()
    got = [q.get(timeout=5) for _ in range(3)]
    state.pending[2] = ["d"]  # pushed later: picked up by a later sweep
    got.append(q.get(timeout=5))
    stop.set()
    t.join()
    assert sorted(got) == ["a", "b", "c", "d"] and q.empty()
    # between sweeps it sleeps the configured interval (Flower's own loop: 0.1 s)
    assert Stop.waits and min(Stop.waits) == 0.002


def test_only_nodes_with_undelivered_messages_are_swept():
    from types import SimpleNamespace as NS

    from guardedtuning.server_app.dispatch import nodes_with_pending_messages

    def msg(dst, delivered):
        return NS(metadata=NS(dst_node_id=dst, delivered_at=delivered))

    state = NS(message_ins_store={"a": msg(1, ""), "b": msg(2, "2026-11-22T00:00:00"), "c": msg(3, ""),
                                  "d": msg(99, "")})
    assert sorted(nodes_with_pending_messages(state, {1: 0, 2: 1, 3: 2})) == [1, 3]
    assert list(nodes_with_pending_messages(NS(), {1: 0, 2: 1})) == [1, 2]  # unknown backend: full sweep


def test_gate_off_keeps_flowers_dispatcher(monkeypatch):
    original = vce_api.add_messages_to_queue
    monkeypatch.setattr(vce_api, "add_messages_to_queue", original)
    monkeypatch.setenv(compat.ENV_VAR, "off")
    assert install(0.002) == f"flower ({compat.ENV_VAR}=off)"
    assert vce_api.add_messages_to_queue is original


def test_unknown_flower_version_keeps_flowers_dispatcher(monkeypatch):
    original = vce_api.add_messages_to_queue
    monkeypatch.setattr(vce_api, "add_messages_to_queue", original)
    monkeypatch.setattr(compat, "flower_version", lambda: "1.99.0")
    assert install(0.002) == "flower (not patched for flwr 1.99.0)"
    assert vce_api.add_messages_to_queue is original
