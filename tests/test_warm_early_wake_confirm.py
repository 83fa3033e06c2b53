"""The warm SuperNode's early wake when the receipt's confirmation then fails (issue 17, item 2's open case).

With ``--early-wake on`` the runner is woken once a message's objects are stored, before
Flower's loop confirms the receipt to the SuperLink (one round trip, longer under Flower's
retries on a bad link). If ``ConfirmMessageReceived`` then fails, Flower's own
``_pull_and_store_message`` (flwr 1.41/1.42) deletes the message, finishes its task as
failed (which revokes the task's token) and returns None; its loop then pushes nothing.

Meanwhile the runner may have got as far as it likes. These tests drive Flower's real
``_pull_and_store_message`` and ``_push_messages`` on a real ``NodeState``, through what the
warm SuperNode installs, and play the runner with Flower's own Runtime API handlers behind
Flower's own task-token check (``authenticate_task``: a refused token is the HTTP 401 the
runner gets), inside the confirmation's round trip, at each point it can have reached when
the confirmation fails:

- ``input``: it pulled the message and its context; its reply push is then refused;
- ``reply``: it pushed its reply, then its context push is refused;
- ``done``: it pushed its reply and its context (the task completed) before the failure;
- ``race``: its reply push was authenticated before the failure and stored after it;
- ``race-late``: the same push stored later still, after the next message was received
  (after the pull that would drop it) and before Flower's loop sends that message's reply;
- ``race-send``: stored later still, inside Flower's push, just before it reads the replies to send.

What must hold: the reply to the failed message never reaches the SuperLink (not with the
next message's push either, which pushes only the next message's reply: on Flower's own
loop a left-over reply went out in its place, one message late, and every later reply with
it), the SuperNode's loop goes on with the next message, and the client's context (its DP
accountant and message sequence, stood in for by a counter of the steps it counted) is
either not advanced for that step, where its reply stayed in the SuperNode, or advanced
(``done``: counted, never released: an over-count, never an under-count).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from guardedtuning import compat
from guardedtuning.clients import warm_node
from tests.test_warm_node_dead_runs import (
    NODE,
    RUN,
    flower_loop,  # noqa: F401 - autouse: Flower's loop restored
    incoming,
    known_run,
    node_state,
)


def runtime(name: str):
    """Flower's Runtime API handler (or request class) ``name``, as listed in :data:`compat.FLOWER_PRIVATE`."""
    return compat.private(f"supernode_runtime.{name}")


class Refused(Exception):
    """The Runtime API refused the task's token (what the runner sees as HTTP 401)."""


class Runner:
    """The warm runner's Flower steps, through Flower's Runtime API handlers and token check."""

    def __init__(self, state) -> None:
        self.state = state
        self.token: str | None = None
        self.message: Message | None = None
        self.context: Context | None = None

    def task(self):
        headers = {compat.private("TASK_TOKEN_HEADER"): self.token}

        class Request:  # what authenticate_task reads of the HTTP request
            class headers:  # noqa: N801
                getlist = staticmethod(lambda name: [headers[name]] if name in headers else [])

        try:
            return compat.private("authenticate_task")(Request(), self.token, self.state)
        except compat.private("FlowerError") as exc:
            raise Refused(str(exc)) from exc

    def acquire_and_pull(self) -> None:
        request = compat.private("AcquireTaskRequest")(supported_task_types=[compat.private("TaskType").CLIENT_APP])
        res = runtime("acquire_task")(request, self.state)
        assert res.HasField("task"), "woken, but no task to acquire"
        self.token = res.token
        got = runtime("pull_task_input")(runtime("PullTaskInputRequest")(), self.state, self.task())
        self.context = compat.private("context_from_proto")(got.context)
        pulled = runtime("pull_messages")(runtime("PullAppMessagesRequest")(), self.state, self.task())
        self.message = compat.private("message_from_proto")(pulled.messages_list[0])
        # the ClientApp's step: it counts itself in the client's state (accountant, message sequence)
        counted = int(self.context.state["privacy"]["steps-counted"]) if "privacy" in self.context.state else 0
        self.context.state["privacy"] = ConfigRecord({"steps-counted": counted + 1})

    def push_reply(self, task=None) -> Message:
        reply = Message(RecordDict({"metrics": MetricRecord({"loss": 1.0})}), reply_to=self.message)
        reply.metadata.__dict__["_message_id"] = reply.object_id  # as Flower's push_message sets it
        assert reply.metadata.message_id == reply.object_id, "Flower's Metadata no longer keeps _message_id"
        request = runtime("PushAppMessagesRequest")(
            messages_list=[compat.private("message_to_proto")(reply)],
            message_object_trees=[compat.private("get_object_tree")(reply)])
        runtime("push_messages")(request, self.state, task or self.task())
        return reply

    def push_output(self) -> None:
        request = runtime("PushTaskOutputRequest")(
            context=compat.private("context_to_proto")(self.context), sub_status=compat.private("SubStatus").COMPLETED,
            details="")
        runtime("push_task_output")(request, self.state, self.task())


def series_context(state) -> Context:
    """The run's FAB and its series' context, as the SuperNode stored them with the run's first message."""
    fab_hash = state.store_fab(compat.private("Fab")(hash_str="", content=b"a FAB", verifications={}))
    state.store_run(dataclasses.replace(state.get_run(RUN), fab_hash=fab_hash))
    state.set_run_series_context(0, Context(run_id=RUN, node_id=NODE, node_config={}, state=RecordDict(),
                                            run_config={}))
    return state.get_run_series_context(0)


def counted(state) -> int:
    ctx = state.get_run_series_context(0)
    return int(ctx.state["privacy"]["steps-counted"]) if "privacy" in ctx.state else 0


def receive(state, wake_r: int, *, during_confirm, confirm_fails: bool):
    """One pass of the SuperNode loop's pull (what is installed); the runner acts inside the confirmation."""
    msg, tree, contents = incoming()

    def confirm(_run: int, _message_id: str) -> None:
        assert os.read(wake_r, 64), "the runner was not woken before the confirmation"
        try:
            during_confirm()
        except BaseException as exc:  # Flower's loop would take it for a failed receipt: fail the test instead
            errors.append(exc)
        if confirm_fails:
            raise ConnectionError("ConfirmMessageReceived: link down")

    errors: list[BaseException] = []
    pull = compat.private("supernode_loop.pull_and_store_message")
    run_id = pull(state=state, object_store=state.object_store, node_config={}, receive=lambda: (msg, tree),
                  get_run=lambda _r: pytest.fail("the run is known"), get_fab=lambda *_: pytest.fail("known FAB"),
                  pull_object=lambda _r, o: contents[o], confirm_message_received=confirm, trusted_entities=None)
    if errors:
        raise errors[0]
    return run_id, msg


def push_replies(state, before_read=None) -> list[Message]:
    """Flower's loop after a message: its real ``_push_messages``; the replies it sends to the SuperLink.

    ``before_read`` runs once, inside the push, right before it reads the replies waiting.
    """
    sent: list[Message] = []
    if before_read is not None:
        read = state.get_messages_legacy

        def late_then_read(*args, **kwargs):
            if state.get_messages_legacy is late_then_read:
                del state.get_messages_legacy
                before_read()
            return read(*args, **kwargs)

        state.get_messages_legacy = late_then_read

    def send(message, _tree, _runtime):
        sent.append(message)
        return set(), "session"  # the SuperLink holds every object already: none to push

    compat.private("supernode_loop.push_messages")(state=state, object_store=state.object_store, send=send,
                                                  push_object=lambda *_: pytest.fail("no object to push"))
    return sent


@pytest.mark.parametrize("reached", ["input", "reply", "done", "race", "race-late", "race-send"])
def test_a_failed_confirmation_after_the_early_wake_releases_nothing_and_never_under_counts(reached):
    state = node_state()
    known_run(state)
    series_context(state)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    try:
        status = warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002,
                                                   wakeup_fd=wake_w, object_concurrency=compat.OBJECT_CONCURRENCY,
                                                   wake_before_confirm=True)
        assert status.startswith("fast") and "before the receipt" in status, status
        runner = Runner(state)
        authenticated = []

        def during_confirm() -> None:
            runner.acquire_and_pull()
            if reached in ("reply", "done"):
                runner.push_reply()
            if reached == "done":
                runner.push_output()
            if reached in ("race", "race-late", "race-send"):
                authenticated.append(runner.task())  # the push's token check passes now ...

        run_id, failed = receive(state, wake_r, during_confirm=during_confirm, confirm_fails=True)
        assert run_id is None  # Flower's loop: nothing to push for this message
        (task,) = state.get_tasks(run_ids=[RUN])
        assert task.status.status == "finished"
        if reached == "input":
            with pytest.raises(Refused):
                runner.push_reply()
        if reached == "race":
            runner.push_reply(authenticated[0])  # ... and its message is stored after the failure
        if reached in ("input", "reply", "race"):
            with pytest.raises(Refused):  # the task's output (its context) is refused: the step is not counted
                runner.push_output()
        late = runner
        after_failed = counted(state)

        # the next message is received, computed and its reply pushed: only its own
        runner = Runner(state)

        def compute() -> None:
            runner.acquire_and_pull()
            runner.push_reply()
            runner.push_output()

        run_id, nxt = receive(state, wake_r, during_confirm=compute, confirm_fails=False)
        assert run_id == RUN
        if reached == "race-late":  # ... and its message is stored only now, after the pull that drops such replies
            late.push_reply(authenticated[0])
            with pytest.raises(Refused):
                late.push_output()

        def store_late() -> None:
            late.push_reply(authenticated[0])
            with pytest.raises(Refused):
                late.push_output()

        sent = push_replies(state, before_read=store_late if reached == "race-send" else None)
    finally:
        os.close(wake_r)
        os.close(wake_w)
    assert [m.metadata.reply_to_message_id for m in sent] == [nxt.metadata.message_id], (
        "the failed message's reply went to the SuperLink" if any(
            m.metadata.reply_to_message_id == failed.metadata.message_id for m in sent) else sent)
    assert not any(e.message.metadata.reply_to_message_id == failed.metadata.message_id
                   for e in state.msg_store.values()), "the failed message's reply is still waiting in the SuperNode"
    # accounting: the failed step is counted only where its task completed (its reply was never released)
    assert after_failed == (1 if reached == "done" else 0)
    assert counted(state) == after_failed + 1
