"""The warm runner's push of a task's output (issue 17 review, item 2).

A failed push of a live task's output loses its ``context.state`` (a DP-SGD client's
accountant), so it must not be swallowed: the runner logs it and raises (the SuperNode then
restarts its runner). Only the failure the runner's own SuperNode causes is expected: a task
the dead-run cleanup finished (:mod:`guardedtuning.clients.dead_runs`) has its token revoked,
so the runner's input pull and its output push are both refused with 401.
"""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from flwr.app import Context, RecordDict

from guardedtuning import compat
from guardedtuning.clients import warm_node


def unauthorized() -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/runtime")
    return httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))


class Client:
    """A Runtime API client whose PushTaskOutput fails with ``push_fails`` (if set)."""

    def __init__(self, push_fails: BaseException | None, pushed: list) -> None:
        self.push_fails, self.pushed = push_fails, pushed

    def PushTaskOutput(self, request):  # noqa: N802 - Flower's name
        self.pushed.append(request)
        if self.push_fails is not None:
            raise self.push_fails

    def close(self) -> None:
        pass


class Retry:
    max_tries = 5


class Heartbeat:
    is_running = False

    def __init__(self, *_a) -> None:
        pass

    def start(self) -> None:
        self.is_running = True

    def stop(self) -> None:
        self.is_running = False


def runner(monkeypatch, *, pull_fails: BaseException | None, push_fails: BaseException | None):
    """A TaskRunner whose Flower steps are stand-ins; returns it and the pushes made."""
    pushed: list = []
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})

    def pull_task_input(_client):
        if pull_fails is not None:
            raise pull_fails
        return SimpleNamespace(metadata=SimpleNamespace(created_at=0.0)), context, None, None

    # Flower's own push_task_output (it logs and swallows an httpx.HTTPError itself)
    fakes = {"pull_task_input": pull_task_input, "push_message": lambda *_a: None, "HeartbeatSender": Heartbeat,
             "make_task_heartbeat_fn_http": lambda _c: None}
    monkeypatch.setattr(warm_node, "flower", lambda name: fakes.get(name) or compat.private(name))
    task_runner = warm_node.TaskRunner("127.0.0.1:0", insecure=True, root_certificates=None)
    monkeypatch.setattr(task_runner, "_client", lambda _token: (Client(push_fails, pushed), Retry()))
    monkeypatch.setattr(task_runner, "_app", lambda _run, _fab: lambda message, context: "reply")
    return task_runner, pushed


@pytest.mark.parametrize("failure", [unauthorized(), httpx.ConnectError("link down"), ConnectionError("link down")],
                         ids=["401", "httpx-connect", "connection"])
def test_a_live_tasks_failed_output_push_is_raised(monkeypatch, failure):
    task_runner, pushed = runner(monkeypatch, pull_fails=None, push_fails=failure)
    with pytest.raises(type(failure)):
        task_runner.run_task("token")
    assert pushed and pushed[0].sub_status == compat.private("SubStatus").COMPLETED
    assert pushed[0].HasField("context")  # the state that would have been lost


def test_a_discarded_tasks_refused_output_push_is_logged_and_the_runner_goes_on(monkeypatch, caplog):
    task_runner, pushed = runner(monkeypatch, pull_fails=unauthorized(), push_fails=unauthorized())
    with caplog.at_level("WARNING", logger="guardedtuning.node"):
        status = task_runner.run_task("token")
    assert status == compat.private("SubStatus").FAILED and not pushed[0].HasField("context")
    assert "discarded" in caplog.text


def test_a_task_whose_input_failed_otherwise_still_raises_on_a_failed_push(monkeypatch):
    task_runner, _ = runner(monkeypatch, pull_fails=ConnectionError("input"), push_fails=ConnectionError("output"))
    with pytest.raises(ConnectionError, match="output"):
        task_runner.run_task("token")
