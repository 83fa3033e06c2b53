"""The warm SuperNode after its run's ServerApp died mid-message (issue 17, item 3's open fault).

When a ServerApp is killed, the SuperLink soon marks its run not ``RUNNING``. A SuperNode
that is receiving one of that run's messages at that moment runs Flower's own
``_pull_and_store_message`` (flwr 1.42): it has already created the ClientApp task and
stored the message (without its content) when the content pull raises
``RunNotRunningException``; Flower logs "Ignoring message" and returns, leaving the task
pending and the message stored. Flower's stock SuperNode starts a process per task, so an
orphan only wastes one process; the warm runner runs tasks one at a time, acquired the
orphan, and waited for content that never comes (Flower's pull waits up to 2 h), so the
SuperNode never answered the resumed run's key stage ("no reply before comm.timeout").

These tests drive Flower's real ``_pull_and_store_message`` on a real ``NodeState`` with
a connection whose content pull reports the run gone, and check what the warm SuperNode's
loop leaves behind: no task a runner could acquire, no stored message of the dead run;
and that a live run's message is left as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from guardedtuning import compat
from guardedtuning.clients import warm_node

# every Flower attribute the warm SuperNode's loop patch may replace (warm_transfers.patch_supernode_polling)
LOOP_PATCHES = ("supernode_loop.pull_and_store_message", "supernode_loop.time", "supernode_loop.pull_objects",
                "supernode_loop.push_object_contents_from_iterable", "inflatable.get_num_workers",
                "supernode_loop.push_messages")
RUN, NODE = 4242, 7


@pytest.fixture(autouse=True)
def flower_loop(monkeypatch):
    """Every attribute of :data:`LOOP_PATCHES`, restored after each test; the gate on.

    Imported by the other warm-SuperNode test modules (tests/test_wan_transfers.py,
    tests/test_warm_early_wake_confirm.py), so each restores the same set.
    """
    monkeypatch.delenv(compat.ENV_VAR, raising=False)
    for name in LOOP_PATCHES:
        module, attribute = compat.owner(name), compat.FLOWER_PRIVATE[name].split(":")[1]
        monkeypatch.setattr(module, attribute, getattr(module, attribute))


def node_state():
    state = compat.private("NodeStateFactory")(compat.private("ObjectStoreFactory")()).state()
    state.set_node_id(NODE)
    return state


def known_run(state, run_id: int = RUN) -> None:
    """A run the SuperNode already knows (its FAB and context were stored with its first message)."""
    run_type, run_status = compat.private("Run"), compat.private("RunStatus")
    state.store_run(run_type(run_id=run_id, fab_id="", fab_version="", fab_hash="h", override_config={}, pending_at="",
                        starting_at="", running_at="", finished_at="", status=run_status("running", "", ""),
                        flwr_aid="", federation_id="", primary_task_id=None, bytes_sent=0, bytes_recv=0,
                        clientapp_runtime=0.0))


def incoming(run_id: int = RUN):
    """A message of ``run_id`` as the SuperNode receives it from the SuperLink: metadata and object tree."""
    task_identity = compat.private("TaskIdentity")  # a Message needs the run it belongs to
    task_identity.task_id, task_identity.run_id, task_identity.node_id = 1, run_id, NODE
    msg = Message(RecordDict({"arrays": ArrayRecord({"x": Array(np.arange(64, dtype=np.float32))}),
                              "config": ConfigRecord({"server-round": 2})}), dst_node_id=NODE, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    contents = {oid: obj.deflate() for oid, obj in compat.get_all_nested_objects(msg).items()}
    return msg, compat.private("get_object_tree")(msg), contents


def pull_once(state, *, run_gone: bool, run_id: int = RUN):
    """One pass of the SuperNode loop's pull through whatever is installed as Flower's function."""
    gone = compat.private("RunNotRunningException")
    msg, tree, contents = incoming(run_id)

    def pull_object(_run: int, object_id: str) -> bytes:
        if run_gone:
            raise gone  # what the SuperLink answers once the ServerApp died
        return contents[object_id]

    pull = compat.private("supernode_loop.pull_and_store_message")
    got = pull(state=state, object_store=state.object_store, node_config={}, receive=lambda: (msg, tree),
               get_run=lambda _r: pytest.fail("the run is known"), get_fab=lambda *_: pytest.fail("the FAB is known"),
               pull_object=pull_object, confirm_message_received=lambda *_: None, trusted_entities=None)
    return got, msg


def leftovers(state, run_id: int = RUN) -> tuple[list, list]:
    """(unfinished tasks of ``run_id``, its stored non-reply messages) as a runner would find them."""
    finished = compat.private("Status").FINISHED
    tasks = [t for t in state.get_tasks(run_ids=[run_id]) if t.status.status != finished]
    messages = state.get_messages_legacy(run_ids=[run_id], is_reply=False)
    return tasks, messages


def test_flowers_own_loop_leaves_an_orphan_task_when_the_run_dies_mid_message():
    """The fault itself, on Flower's unpatched function (documents what the warm loop must clean up)."""
    state = node_state()
    known_run(state)
    got, _ = pull_once(state, run_gone=True)
    assert got is None
    tasks, messages = leftovers(state)
    assert len(tasks) == 1 and tasks[0].status.status == "pending" and len(messages) == 1


def test_warm_loop_discards_the_dead_runs_task_and_message():
    state = node_state()
    known_run(state)
    warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002)
    got, msg = pull_once(state, run_gone=True)
    assert got is None
    tasks, messages = leftovers(state)
    assert tasks == [] and messages == [], (tasks, messages)
    finished = state.get_tasks(run_ids=[RUN])
    assert len(finished) == 1 and finished[0].status.sub_status == "failed"
    assert "not RUNNING" in finished[0].status.details
    # the runner now acquires nothing of the dead run
    request = compat.private("AcquireTaskRequest")(supported_task_types=[compat.private("TaskType").CLIENT_APP])
    assert not compat.private("supernode_runtime.acquire_task")(request, state).HasField("task")
    assert state.object_store.get(msg.metadata.message_id) is None


def test_warm_loop_keeps_a_live_runs_message_and_an_earlier_unfinished_task():
    """Only a task created by a pull that returned no run is discarded; a live run's message stays."""
    state = node_state()
    known_run(state)
    known_run(state, RUN + 1)
    warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002)
    got, _ = pull_once(state, run_gone=False, run_id=RUN + 1)
    assert got == RUN + 1
    got, _ = pull_once(state, run_gone=True)  # another run's message dies: the live one is untouched
    assert got is None
    tasks, messages = leftovers(state, RUN + 1)
    assert len(tasks) == 1 and tasks[0].status.status == "pending" and len(messages) == 1
    assert leftovers(state) == ([], [])


def test_an_orphan_the_runner_already_acquired_is_finished_too():
    """The race: the runner's fallback poll acquires the task while its content pull fails."""
    state = node_state()
    known_run(state)
    warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002)
    request = compat.private("AcquireTaskRequest")(supported_task_types=[compat.private("TaskType").CLIENT_APP])
    acquire = compat.private("supernode_runtime.acquire_task")
    gone = compat.private("RunNotRunningException")
    msg, tree, _ = incoming()
    acquired = []

    def pull_object(_run: int, _object_id: str) -> bytes:
        acquired.append(acquire(request, state))  # the runner takes the task before the content fails
        raise gone

    pull = compat.private("supernode_loop.pull_and_store_message")
    assert pull(state=state, object_store=state.object_store, node_config={}, receive=lambda: (msg, tree),
                get_run=None, get_fab=None, pull_object=pull_object, confirm_message_received=lambda *_: None,
                trusted_entities=None) is None
    assert acquired and acquired[0].HasField("task")
    (task,) = state.get_tasks(run_ids=[RUN])
    assert task.status.status == "finished" and task.status.sub_status == "failed"
    assert leftovers(state) == ([], [])


def test_an_orphan_whose_message_the_runner_already_pulled_is_dropped():
    """The usual order in the real fault: the runner acquired the task and pulled its message (Flower marks it
    retrieved) before the content pull failed; the message and its objects must still go."""
    state = node_state()
    known_run(state)
    warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002)
    handlers = compat.owner("supernode_runtime.acquire_task")  # Flower's Runtime API handlers
    request = compat.private("AcquireTaskRequest")(supported_task_types=[compat.private("TaskType").CLIENT_APP])
    gone = compat.private("RunNotRunningException")
    msg, tree, _ = incoming()
    mid = msg.metadata.message_id
    pulled = []

    def pull_object(_run: int, _object_id: str) -> bytes:
        task = handlers.acquire_task(request, state).task
        pulled.append(handlers.pull_messages(handlers.PullAppMessagesRequest(), state, task))
        raise gone

    pull = compat.private("supernode_loop.pull_and_store_message")
    assert pull(state=state, object_store=state.object_store, node_config={}, receive=lambda: (msg, tree),
                get_run=None, get_fab=None, pull_object=pull_object, confirm_message_received=lambda *_: None,
                trusted_entities=None) is None
    assert pulled and len(pulled[0].messages_list) == 1  # the runner did get the message
    assert mid not in state.msg_store, "the orphan's message stays in the SuperNode's store"
    assert state.object_store.get(mid) is None
    (task,) = state.get_tasks(run_ids=[RUN])
    assert task.status.status == "finished" and task.status.sub_status == "failed"


def test_a_live_runs_earlier_message_survives_a_failed_pull_of_the_same_run():
    """Only the message whose content pull failed is dropped, not every pending message of its run
    (Flower raises RunNotRunningException for any PERMISSION_DENIED)."""
    state = node_state()
    known_run(state)
    warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002)
    got, first = pull_once(state, run_gone=False)
    assert got == RUN
    got, second = pull_once(state, run_gone=True)
    assert got is None
    assert first.metadata.message_id != second.metadata.message_id
    assert first.metadata.message_id in state.msg_store and second.metadata.message_id not in state.msg_store
    tasks, _ = leftovers(state)
    assert len(tasks) == 1  # the live message's task is still there for the runner


def test_a_failing_cleanup_does_not_stop_the_supernode(monkeypatch, caplog):
    state = node_state()
    known_run(state)
    warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002)

    def broken(*_a, **_k):
        raise RuntimeError("store unavailable")

    monkeypatch.setattr(state, "finish_task", broken)
    with caplog.at_level("ERROR", logger="guardedtuning.node"):
        got, _ = pull_once(state, run_gone=True)
    assert got is None
    assert "store unavailable" in caplog.text


def test_a_pull_function_with_another_signature_keeps_flowers_loop(monkeypatch):
    """The cleanup needs Flower's ``state``/``object_store``/``receive`` parameters: checked at install time."""
    name = "supernode_loop.pull_and_store_message"
    module, attribute = compat.owner(name), compat.FLOWER_PRIVATE[name].split(":")[1]
    monkeypatch.setattr(module, attribute, lambda link, store: None)
    how = warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002)
    assert how.startswith("flower") and "signature" in how
