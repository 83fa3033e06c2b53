"""The in-process runner computes what Flower's simulation engine computes (the sweep's fast path)."""

from __future__ import annotations

import math

import pytest

from guardedtuning.inprocess import InProcessGrid, node_ids, run_in_process
from guardedtuning.launcher import run_to_completion
from guardedtuning.recipes import config_for
from tests.conftest import TINY

# every recorded number a round has that is a computation's result (not a time or a memory figure)
COMPUTED = ("train_loss", "test_loss", "epsilon", "epsilon_model")
ACCURACY = ("utility", "accuracy")  # a fraction of the held-out rows: a float difference may flip one row
# the serialised messages carry the run and node ids (random 64-bit varints in Flower's engine; the secure
# aggregation's stages name nodes in their content too): the byte counts differ by those few bytes per message
BYTES = ("bytes_up", "bytes_down")


def _cfg(tmp_path, name, recipe, **sets):
    flat = {k: v for k, v in TINY.items() if k != "recipe"}
    if recipe != "split":  # the recipe's own privacy knobs (the guarded default's), tiny-bert's sizes
        flat = {k: v for k, v in flat.items() if k.startswith(("model.", "data.", "federation.", "train."))}
        flat["split.layer"] = 2
    return config_for(recipe, {**flat, **sets, "output.dir": str(tmp_path / name)})


def _close(a, b, rel=1e-4):
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-6)


def test_node_ids_are_distinct_and_reproducible():
    ids = node_ids(50, seed=3)
    assert len(set(ids)) == 50 and all(0 < n < 2**64 for n in ids)
    assert ids == node_ids(50, seed=3) and ids != node_ids(50, seed=4)


def test_a_client_gets_a_copy_and_an_exception_becomes_an_error_reply():
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    seen = []

    @app.train()
    def train(msg, context):
        arr = msg.content["a"]
        seen.append((context.node_config["partition-id"], arr))
        calls = int(context.state["calls"]["n"]) if "calls" in context.state else 0
        context.state["calls"] = ConfigRecord({"n": calls + 1})
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("boom")
        return Message(RecordDict({"a": arr}), reply_to=msg)

    grid = InProcessGrid(app, 2, {"x": 1}, seed=0)
    sent = ArrayRecord([np.arange(3.0)])
    msgs = [Message(RecordDict({"a": sent}), n, "train") for n in grid.get_node_ids()]
    ids = list(grid.push_messages(msgs))
    replies = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(ids)}
    assert set(replies) == set(ids)
    assert not replies[ids[0]].has_error() and replies[ids[1]].has_error()
    assert "boom" in replies[ids[1]].error.reason
    assert all(arr is not sent for _, arr in seen)  # the server's object never reaches the client
    assert [p for p, _ in seen] == [0, 1]
    assert grid.pull_messages(ids) == []  # each reply is pulled once
    # as in Flower's engine: a call that raised leaves the node's state as it was, one that answered keeps it
    ok, failed = grid.get_node_ids()
    assert grid.contexts[ok].state["calls"]["n"] == 1 and "calls" not in grid.contexts[failed].state


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path):
    from guardedtuning.errors import ConfigError
    from guardedtuning.launcher import OutputLock

    cfg = _cfg(tmp_path, "busy", "split")
    held = OutputLock(tmp_path / "busy")
    held.acquire()  # a live holder: this process, through another open file
    try:
        with pytest.raises(ConfigError, match=f"in use by a live run .PID {__import__('os').getpid()}"):
            run_in_process(cfg)
    finally:
        held.release()
    assert not (tmp_path / "busy" / "results.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", ["split", "guarded"])
def test_in_process_gives_the_record_of_flowers_simulation_engine(tmp_path, recipe):
    """The same config on both paths: every round's losses and ε agree to 1e-3 (relative), its accuracy to one
    held-out row, its bytes to 1 %.

    ``guarded`` runs with the default's noise, DP-SGD and secure aggregation, its noise seeded
    (``privacy.noise-seed``) so that both paths draw the same. Flower's engine draws the node ids
    at random, so the clients' replies come in another node-id order than in process; the server's
    top takes them in an order of their own content (``training.canonical_order``), so its dropout
    masks, its length groups and its float sums do not follow the node ids (they did: with the
    trimmed top pass the records drifted by 1.5e-3 in a test loss after two rounds). What still
    differs: the secure sum's stochastic rounding draws fresh OS entropy, and the aggregation sums
    the updates in node-id order.
    """
    rel = 1e-3
    sets = {"privacy.noise-seed": 7} if recipe == "guarded" else {}
    flower = run_to_completion(_cfg(tmp_path, "flower", recipe, **sets))
    inproc = run_in_process(_cfg(tmp_path, "inproc", recipe, **sets))
    assert len(flower["history"]) == len(inproc["history"]) == TINY["federation.rounds"]
    for a, b in zip(flower["history"], inproc["history"], strict=True):
        diff = {k: (a.get(k), b.get(k)) for k in COMPUTED if not _close(a.get(k), b.get(k), rel)}
        diff.update({k: (a[k], b[k]) for k in BYTES if not _close(a[k], b[k], rel=1e-2)})
        one_row = 1.0 / TINY["data.test-size"] + 1e-9
        diff.update({k: (a[k], b[k]) for k in ACCURACY if abs(a[k] - b[k]) > one_row})
        assert not diff, f"round {a['round']}: {diff}"
    assert abs(flower["utility"]["value"] - inproc["utility"]["value"]) <= 1.0 / TINY["data.test-size"] + 1e-9
    assert flower["privacy"].get("epsilon") == pytest.approx(inproc["privacy"].get("epsilon"))
    assert flower["cost"]["rejected_replies"] == inproc["cost"]["rejected_replies"] == 0
    assert inproc["cost"]["dispatch"] == "in-process"
