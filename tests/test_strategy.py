from __future__ import annotations

import uuid

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from guardedtuning.compat import TaskIdentity
from guardedtuning.strategies.fedavg import AdapterFedAvg
from guardedtuning.wire.records import message_nbytes, record_to_tensors, tensors_to_record
from tests.local_grid import LocalGrid

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
SHAPES = {"a": (2, 3), "b": (4,)}


def _reply(node, arrays, n, request):
    content = RecordDict({"update": ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": float(n)})})
    msg = Message(content, reply_to=request)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _setup(k=3):
    grid = LocalGrid(ClientApp(), 4, {})
    strat = AdapterFedAvg(clients_per_round=k, seed=0)
    zeros = ArrayRecord({k_: Array(np.zeros(s, dtype=np.float32)) for k_, s in SHAPES.items()})
    msgs = list(strat.configure_train(1, zeros, ConfigRecord({}), grid))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return strat, msgs


def test_weighted_average_of_updates():
    strat, msgs = _setup()
    rng = np.random.default_rng(0)
    ups = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in msgs]
    weights = [10, 30, 60]
    replies = [_reply(m.metadata.dst_node_id, u, w, m) for m, u, w in zip(msgs, ups, weights, strict=True)]
    avg, metrics = strat.aggregate_train(1, replies)
    for k in SHAPES:
        expected = sum(u[k] * w for u, w in zip(ups, weights, strict=True)) / 100
        np.testing.assert_allclose(avg[k].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["num-examples"] == 100 and metrics["clients"] == 3


def test_bad_replies_are_rejected_with_reasons():
    strat, msgs = _setup(k=4)
    good = {k: np.ones(s) for k, s in SHAPES.items()}
    bad_shape = {"a": np.ones((3, 2)), "b": np.ones(4)}
    nan = {"a": np.full((2, 3), np.nan), "b": np.ones(4)}
    replies = [
        _reply(msgs[0].metadata.dst_node_id, good, 5, msgs[0]),
        _reply(msgs[0].metadata.dst_node_id, good, 5, msgs[0]),  # duplicate node
        _reply(msgs[1].metadata.dst_node_id, bad_shape, 5, msgs[1]),
        _reply(msgs[2].metadata.dst_node_id, nan, 5, msgs[2]),
        Message(Error(code=0, reason="exploded"), reply_to=msgs[3]),
    ]
    avg, metrics = strat.aggregate_train(1, replies)
    np.testing.assert_allclose(avg["a"].numpy(), 1.0)
    reasons = " | ".join(strat.rejections)
    assert "a second reply" in reasons and "has shape (3, 2), expected (2, 3)" in reasons
    assert "NaN" in reasons and "exploded" in reasons and len(strat.rejections) == 4
    assert metrics["clients"] == 1


def test_nothing_valid_means_no_aggregate():
    strat, msgs = _setup()
    avg, metrics = strat.aggregate_train(1, [Message(Error(code=0, reason="x"), reply_to=msgs[0])])
    assert avg is None and metrics is None


def test_sampling_is_seeded_and_within_the_connected_nodes():
    grid = LocalGrid(ClientApp(), 10, {})
    a = AdapterFedAvg(clients_per_round=4, seed=1)
    b = AdapterFedAvg(clients_per_round=4, seed=1)
    assert a.sample(3, grid) == b.sample(3, grid) and len(set(a.sample(3, grid))) == 4
    draws = {tuple(a.sample(r, grid)) for r in range(1, 11)}
    assert len(draws) >= 5  # rounds draw different clients
    assert tuple(AdapterFedAvg(clients_per_round=4, seed=2).sample(3, grid)) != tuple(a.sample(3, grid)) or \
        tuple(AdapterFedAvg(clients_per_round=4, seed=2).sample(4, grid)) != tuple(a.sample(4, grid))
    assert set(a.sample(2, grid)) <= set(grid.get_node_ids())


def test_tensor_records_round_trip_and_reject_nan():
    t = {"x": torch.randn(3, 4), "y": torch.arange(5)}
    back = record_to_tensors(tensors_to_record(t), source="t")
    assert torch.equal(back["x"], t["x"]) and torch.equal(back["y"], t["y"])
    bad = tensors_to_record({"x": torch.tensor([1.0, float("nan")])})
    try:
        record_to_tensors(bad, source="reply of node 7")
    except Exception as exc:  # noqa: BLE001
        assert "reply of node 7: array 'x' holds NaN" in str(exc)
    else:
        raise AssertionError("NaN accepted")


def test_message_bytes_grow_with_the_payload():
    small = Message(RecordDict({"a": tensors_to_record({"x": torch.zeros(10)})}), dst_node_id=5, message_type="train")
    big = Message(RecordDict({"a": tensors_to_record({"x": torch.randn(10_000)})}), dst_node_id=5, message_type="train")
    # 4 bytes a float32 more, plus a few bytes of metadata (shape, dtype)
    assert 4 * 9_990 <= message_nbytes(big) - message_nbytes(small) <= 4 * 9_990 + 200


def _plus(step: float, reply_key: str):
    """A plain Flower ClientApp (no GuardedTuning code) that adds ``step`` to every weight."""
    app = ClientApp()

    @app.train()
    def train(msg, context):  # type: ignore[no-untyped-def]
        got = msg.content["arrays"]
        new = {k: got[k].numpy() + np.float32(step) for k in got.keys()}
        out = new if reply_key == "arrays" else {k: new[k] - got[k].numpy() for k in new}
        return Message(RecordDict({reply_key: ArrayRecord({k: Array(v) for k, v in out.items()}),
                                   "metrics": MetricRecord({"num-examples": 3})}), reply_to=msg)

    return app


def test_start_installs_the_new_global_not_the_update():
    """Flower's own Strategy.start(): three rounds of +0.01 end at 0.03 (not 0.01), both reply kinds."""
    for key in ("update", "arrays"):
        grid = LocalGrid(_plus(0.01, key), 3, {})
        init = ArrayRecord({k_: Array(np.zeros(s, dtype=np.float32)) for k_, s in SHAPES.items()})
        result = AdapterFedAvg(clients_per_round=3, seed=0).start(grid, init, num_rounds=3, timeout=5)
        for k in SHAPES:
            np.testing.assert_allclose(result.arrays[k].numpy(), 0.03, rtol=1e-5)


def test_aggregate_adds_the_mean_update_to_the_sent_global():
    grid = LocalGrid(ClientApp(), 4, {})
    strat = AdapterFedAvg(clients_per_round=2, seed=0)
    glob = {k: np.full(s, 0.5, dtype=np.float32) for k, s in SHAPES.items()}
    msgs = list(strat.configure_train(1, ArrayRecord({k: Array(v) for k, v in glob.items()}), ConfigRecord({}), grid))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    a, b = msgs
    ups = {k: np.full(s, 0.25) for k, s in SHAPES.items()}
    new_b = {k: glob[k] + 1.0 for k in SHAPES}  # node b replies its new weights: update +1
    rb = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new_b.items()}),
                             "metrics": MetricRecord({"num-examples": 3.0})}), reply_to=b)
    rb.metadata.__dict__["_src_node_id"] = b.metadata.dst_node_id
    avg, _ = strat.aggregate_train(1, [_reply(a.metadata.dst_node_id, ups, 1, a), rb])
    for k in SHAPES:
        np.testing.assert_allclose(avg[k].numpy(), 0.5 + (0.25 * 1 + 1.0 * 3) / 4, rtol=1e-6)
    neither = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1.0})}), reply_to=a)
    assert strat.aggregate_train(1, [neither]) == (None, None)
    assert "carries neither 'update'" in strat.rejections[-1]
