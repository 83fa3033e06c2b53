"""Round trips of one split step between a warm SuperNode and its SuperLink (issue 17, item 2).

Every request a SuperNode makes to the SuperLink is one round trip over its link. For one
split step, Flower's SuperNode loop (flwr 1.41/1.42) makes, in this order:

- ``PullMessages`` until the step's message is there (the message and its object tree);
- one ``PullObject`` per object of the tree (the message, its record dict, each record,
  each array, each array chunk), at most ``min(2, CPU cores)`` at once;
- ``ConfirmMessageReceived``; only then does the ClientApp (our runner) get the task;
- after the ClientApp: ``PushMessages`` (the reply's tree; the SuperLink answers which
  objects it lacks), then one ``PushObject`` per object, again 2 at once.

Here a stand-in link answers every request after ``RTT`` seconds and records it; the
tests drive Flower's real ``_pull_and_store_message`` on a real ``NodeState`` (through
whatever the warm SuperNode installed) and the push function Flower's ``_push_messages``
calls, with the split step's real messages (:mod:`guardedtuning.wire.split`). They count
the round trips until the runner may start the step and until the reply's last object is
up, and check that the bytes that arrive are the bytes that were sent, so the step's
tensors (and everything computed from them) are bit-identical to Flower's path.
"""

from __future__ import annotations

import inspect
import math
import os
import select
import threading
import time

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from guardedtuning import compat
from guardedtuning.clients import warm_node
from guardedtuning.wire import split as wire
from tests.test_warm_node_dead_runs import (
    LOOP_PATCHES,
    NODE,
    RUN,
    flower_loop,  # noqa: F401 - autouse: Flower's loop restored
    known_run,
    node_state,
)

RTT = 0.15  # seconds each stand-in request takes (generous: thread starts on a loaded CI machine)


class Link:
    """The SuperLink as a SuperNode sees it over a link of round trip ``RTT``: requests are logged."""

    def __init__(self, contents: dict[str, bytes] | None = None) -> None:
        self.contents = contents or {}
        self.pushed: dict[str, bytes] = {}
        self.log: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()

    def _request(self, kind: str) -> None:
        start = time.monotonic()
        time.sleep(RTT)
        with self.lock:
            self.log.append((kind, start, time.monotonic()))

    def pull_object(self, _run: int, object_id: str) -> bytes:
        self._request("PullObject")
        return self.contents[object_id]

    def confirm(self, _run: int, _message_id: str) -> None:
        self._request("ConfirmMessageReceived")

    def push_object(self, object_id: str, content: bytes) -> None:
        self._request("PushObject")
        with self.lock:
            self.pushed[object_id] = content

    def count(self, kind: str) -> int:
        return sum(1 for k, _, _ in self.log if k == kind)


def set_task_identity() -> None:
    task_identity = compat.private("TaskIdentity")
    task_identity.task_id, task_identity.run_id, task_identity.node_id = 1, RUN, NODE


def step_message() -> Message:
    """Step 1 of a round under ``split.grad-bits=8``: trimmed 8-bit gradient, 10 objects (float32: 6)."""
    set_task_identity()
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(16, 64, dtype=torch.long)
    mask[:, 40:] = 0
    msg = wire.step_message(NODE, 2, 1, 3, torch.randn(16, 64, 128, generator=g), mask=mask, bits=8)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def step_reply() -> Message:
    """A reply under ``privacy.quantize-bits=8``: codes, scales, meta, mask, labels, metrics: 14 objects (float: 10)."""
    set_task_identity()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(16, 64, dtype=torch.long)
    mask[:, 40:] = 0
    from guardedtuning.privacy.quantize import quantize_activations
    q = dict(quantize_activations(torch.randn(16, 64, 128, generator=g), bits=8).arrays())
    acts = wire.acts_record({**q, "mask": mask.numpy().astype(np.uint8), "labels": np.arange(16) % 2}, trim=True)
    content = RecordDict({"acts": acts, "metrics": MetricRecord({"compute_s": 0.25, "t_start": 1.0, "t_end": 2.0})})
    return Message(content=content, message_type=wire.MESSAGE_TYPE, dst_node_id=0)


def receive_step(state, link: Link, msg: Message, wake_r: int | None):
    """Flower's loop pulls ``msg``; returns (its run, seconds until the runner was woken or None, seconds in all)."""
    tree = compat.private("get_object_tree")(msg)
    woke: list[float] = []
    found: list[bool] = []

    def watch() -> None:
        if wake_r is not None and select.select([wake_r], [], [], 10)[0]:
            woke.append(time.monotonic())
            os.read(wake_r, 64)
            # what the runner then does: acquire the task; every object of the message is stored
            request = compat.private("AcquireTaskRequest")(
                supported_task_types=[compat.private("TaskType").CLIENT_APP])
            found.append(compat.private("supernode_runtime.acquire_task")(request, state).HasField("task")
                         and all(state.object_store.get(o) for o in link.contents))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    pull = compat.private("supernode_loop.pull_and_store_message")
    run_id = pull(state=state, object_store=state.object_store, node_config={}, receive=lambda: (msg, tree),
                  get_run=lambda _r: pytest.fail("the run is known"), get_fab=lambda *_: pytest.fail("known FAB"),
                  pull_object=link.pull_object, confirm_message_received=link.confirm, trusted_entities=None)
    total = time.monotonic() - t0
    watcher.join(10)
    if wake_r is not None:
        assert found == [True], "woken before the task and all its objects were there"
    return run_id, (woke[0] - t0) if woke else None, total


def install(*, fast: bool, wake_w: int | None) -> str:
    """``fast``: both changes (``--early-wake on``, opt-in); else the old path (Flower's 2 at once, after)."""
    backoff = warm_node.Backoff(start=0.005, limit=3.0)
    if fast:
        return warm_node.patch_supernode_polling(backoff, reply_poll=0.002, wakeup_fd=wake_w,
                                                 object_concurrency=compat.OBJECT_CONCURRENCY,
                                                 wake_before_confirm=True)
    return warm_node.patch_supernode_polling(backoff, reply_poll=0.002, wakeup_fd=wake_w,
                                             object_concurrency=2, wake_before_confirm=False)


def pull_step(fast: bool):
    msg = step_message()
    contents = {oid: obj.deflate() for oid, obj in compat.get_all_nested_objects(msg).items()}
    link = Link(contents)
    state = node_state()
    known_run(state)
    wake_r, wake_w = os.pipe()
    try:
        status = install(fast=fast, wake_w=wake_w)
        assert status.startswith("fast"), status
        run_id, woke_s, total_s = receive_step(state, link, msg, wake_r)
    finally:
        os.close(wake_r)
        os.close(wake_w)
    assert run_id == RUN
    # bit-identical: every object the SuperNode stored is the byte string the SuperLink held
    assert {o: state.object_store.get(o) for o in contents} == contents
    return link, woke_s, total_s


def test_a_split_step_message_is_pulled_in_one_round_trip_and_the_runner_starts_before_the_confirm():
    link, woke_s, total_s = pull_step(fast=True)
    n = len(link.contents)
    assert n >= 6  # message, record dict, config, grad record, its arrays and chunks
    assert link.count("PullObject") == n and link.count("ConfirmMessageReceived") == 1
    # one round trip for every object, then the runner starts while the receipt is confirmed
    print(f"\nnew path, RTT {RTT} s: {n} objects, runner woken after {woke_s / RTT:.2f} RTT, "
          f"pull and confirm {total_s / RTT:.2f} RTT")
    assert woke_s < 2 * RTT, f"runner woken after {woke_s / RTT:.1f} RTT"
    assert total_s < 3 * RTT, f"pull and confirm took {total_s / RTT:.1f} RTT"


def test_flowers_own_transfers_take_a_round_trip_per_two_objects_and_the_confirm():
    """The same step on the old path (2 objects at once, woken after the confirm): what the change removes."""
    link, woke_s, total_s = pull_step(fast=False)
    layers = math.ceil(len(link.contents) / 2)
    print(f"\nold path, RTT {RTT} s: {len(link.contents)} objects, runner woken after {woke_s / RTT:.2f} RTT, "
          f"pull and confirm {total_s / RTT:.2f} RTT")
    assert woke_s >= (layers + 1) * RTT * 0.95, f"runner woken after {woke_s / RTT:.1f} RTT"


def push_reply(fast: bool) -> tuple[Link, float, dict[str, bytes]]:
    reply = step_reply()
    contents = {oid: obj.deflate() for oid, obj in compat.get_all_nested_objects(reply).items()}
    assert install(fast=fast, wake_w=None).startswith("fast")
    link = Link()
    push = compat.private("supernode_loop.push_object_contents_from_iterable")
    t0 = time.monotonic()
    push(iter(contents.items()), push_object_fn=link.push_object)
    return link, time.monotonic() - t0, contents


def test_a_split_step_reply_is_pushed_in_one_round_trip_with_the_same_bytes():
    link, took, contents = push_reply(fast=True)
    assert len(contents) >= 10 and link.count("PushObject") == len(contents)
    print(f"\nnew path, RTT {RTT} s: reply's {len(contents)} objects pushed in {took / RTT:.2f} RTT")
    assert took < 2 * RTT, f"push took {took / RTT:.1f} RTT"
    assert link.pushed == contents  # bit-identical: what the SuperLink gets is what the ClientApp replied


def test_flowers_own_push_takes_a_round_trip_per_two_objects():
    link, took, contents = push_reply(fast=False)
    print(f"\nold path, RTT {RTT} s: reply's {len(contents)} objects pushed in {took / RTT:.2f} RTT")
    assert took >= math.ceil(len(contents) / 2) * RTT * 0.95
    assert link.pushed == contents


def test_flowers_loop_moves_objects_through_the_functions_the_warm_node_replaces():
    """The SuperNode loop pulls and pushes through the module globals patched here (flwr 1.41/1.42)."""
    loop = compat.owner("supernode_loop.pull_and_store_message")
    assert "push_object_contents_from_iterable(" in inspect.getsource(loop._push_messages)
    # the early wake's send-time drop: the loop calls _push_messages by its module name, which sends through `send`
    assert "_push_messages(" in inspect.getsource(loop.start_client_internal)
    assert "= send(message," in inspect.getsource(loop._push_messages)
    assert "pull_objects(" in inspect.getsource(compat.private("supernode_loop.pull_and_store_message"))
    assert "confirm_message_received(" in inspect.getsource(compat.private("supernode_loop.pull_and_store_message"))
    utils = compat.owner("inflatable.get_num_workers")
    for fn in (utils.pull_objects, utils.push_object_contents_from_iterable):
        assert "get_num_workers(" in inspect.getsource(fn)
    assert {"max_concurrent_pushes"} <= set(inspect.signature(
        compat.private("supernode_loop.push_object_contents_from_iterable")).parameters)
    assert compat.uncapped_num_workers(2) == 2 and compat.uncapped_num_workers(16) == 16


def test_the_old_path_is_one_option_away_and_the_gate_off_patches_nothing(monkeypatch):
    originals = {n: compat.private(n) for n in LOOP_PATCHES}
    monkeypatch.setenv(compat.ENV_VAR, "off")
    assert install(fast=True, wake_w=None) == f"flower ({compat.ENV_VAR}=off)"
    assert {n: compat.private(n) for n in LOOP_PATCHES} == originals
    monkeypatch.delenv(compat.ENV_VAR)
    assert "objects 2 at a time" not in install(fast=True, wake_w=None)
    argv = ["--superlink", "10.0.0.1:9093", "--object-concurrency", "2", "--early-wake", "on", "--port", "9094"]
    assert warm_node.stock_supernode_command(argv)[1:] == ["--superlink", "10.0.0.1:9093", "--port", "9094"]


def test_objects_still_uploading_are_retried_as_flowers_loop_retries_them_not_all_at_once():
    """A message pulled while its sender still uploads: one wide first try, then Flower's retries (2 at once).

    Retrying every pending object at once polled the SuperLink 16 times as often as
    Flower's loop and slowed the upload it waited for (fedlora at zero latency).
    """
    msg = step_message()
    contents = {oid: obj.deflate() for oid, obj in compat.get_all_nested_objects(msg).items()}
    unavailable = compat.private("inflatable.ObjectUnavailableError")
    lock, seen, retries, narrow = threading.Lock(), set(), [], []
    in_flight = [0]
    together = threading.Barrier(len(contents), timeout=5)  # only passes if every first try runs at once

    def pull_object(object_id: str) -> bytes:
        with lock:
            retry = object_id in seen
            seen.add(object_id)
            in_flight[0] += 1
            if retry:
                retries.append(in_flight[0])
        try:
            if not retry:
                try:
                    together.wait()
                except threading.BrokenBarrierError:
                    narrow.append(object_id)
            time.sleep(0.01)
            if not retry:  # every object is still uploading at its first try, however long that took
                raise unavailable(object_id)
            return contents[object_id]
        finally:
            with lock:
                in_flight[0] -= 1

    assert install(fast=True, wake_w=None).startswith("fast")
    got = compat.private("supernode_loop.pull_objects")(list(contents), pull_object_fn=pull_object)
    assert got == contents  # every object, byte for byte
    assert not narrow, "the first tries did not all run at once"  # one round trip for the whole message
    assert len(retries) == len(contents), "each object is retried once, after its first try"
    assert max(retries) <= 2, f"up to {max(retries)} retries in flight"


def test_the_early_wake_is_off_unless_asked_for(monkeypatch):
    """Issue 17 review: ``--early-wake`` is opt-in (no measurable gain; its failure path is the risky one)."""
    status = warm_node.patch_supernode_polling(warm_node.Backoff(start=0.005, limit=3.0), reply_poll=0.002)
    assert status.startswith("fast") and "after the receipt" in status, status
    # Flower's push as it is: nothing of the early wake's installed
    assert not hasattr(compat.private("supernode_loop.push_messages"), "guardedtuning_wrapped")
    seen = []

    class Stop(Exception):
        pass

    def patch(*_args, **kwargs):
        seen.append(kwargs["wake_before_confirm"])
        raise Stop

    monkeypatch.setattr(warm_node, "patch_supernode_polling", patch)
    for argv, wake in (([], False), (["--early-wake", "on"], True), (["--early-wake", "off"], False)):
        with pytest.raises(Stop):
            warm_node.supernode_main(["--superlink", "10.0.0.1:9093", *argv])
        assert seen.pop() is wake, argv
    assert "default off" in warm_node.EARLY_WAKE_HELP and "below the run-to-run noise" in warm_node.EARLY_WAKE_HELP


def test_a_stock_federation_refuses_the_warm_supernodes_options(tmp_path, monkeypatch):
    """Issue 17 review: ``bench_wan --paths old`` on stock SuperNodes silently measured the default path."""
    from types import SimpleNamespace

    from tests.netns import NetnsFederation

    wan = SimpleNamespace(num_nodes=1, port=9092)
    NetnsFederation(tmp_path / "warm", wan, node_args=("--early-wake", "on"))  # warm, Flower supported: taken
    with pytest.raises(ValueError, match="stock .--stock.*drops the warm SuperNode's options"):
        NetnsFederation(tmp_path / "stock", wan, node_args=("--early-wake", "on"), warm=False)
    monkeypatch.setenv(compat.ENV_VAR, "off")
    with pytest.raises(ValueError, match=f"node_args --object-concurrency 2: .*{compat.ENV_VAR}=off"):
        NetnsFederation(tmp_path / "gate", wan, node_args=("--object-concurrency", "2"))
    NetnsFederation(tmp_path / "gate", wan)  # the default path needs no option: taken
