"""An in-process Grid for tests: runs the real ClientApp on each push, no Ray, no SuperLink.

It mirrors what Flower's simulation engine does with a message (one Context per node,
the ClientApp called with it, an exception turned into an error reply), so the
ServerApp drivers can be tested fast and with faults injected: ``tamper(node, request,
reply)`` may change a reply, replace it, or drop it (return None: a timeout).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from guardedtuning.compat import TaskIdentity


class LocalGrid(Grid):
    def __init__(self, app: ClientApp, num_nodes: int, run_config: dict,
                 tamper: Callable[[int, Message, Message], Message | None] | None = None) -> None:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 1
        self.app = app
        self.tamper = tamper
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": num_nodes},
                       state=RecordDict(), run_config=dict(run_config))
            for i, n in enumerate(self.node_ids)
        }
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []  # every reply that reached the server

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._run = run

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what the engine does too
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(node, msg, reply)
            if reply is not None:
                self.replies[mid] = reply
                self.received.append(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return self.pull_messages(self.push_messages(messages))


def crash_before_checkpoint(cfg, monkeypatch, round_: int = 2) -> None:  # type: ignore[no-untyped-def]
    """Run ``cfg`` on a LocalGrid until the server dies just before round ``round_``'s checkpoint."""
    import pytest

    from guardedtuning.clients.client_app import app as client_app
    from guardedtuning.results import Recorder
    from guardedtuning.server_app.server_app import execute

    original = Recorder.save_checkpoint

    def crash(self, r, state):  # type: ignore[no-untyped-def]
        if r == round_:
            raise RuntimeError("simulated crash after aggregation, before the checkpoint")
        return original(self, r, state)

    monkeypatch.setattr(Recorder, "save_checkpoint", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        execute(cfg, LocalGrid(client_app, cfg.federation.num_clients, cfg.flat()))
    monkeypatch.setattr(Recorder, "save_checkpoint", original)
