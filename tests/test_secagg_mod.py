"""Secure aggregation as Flower-native composition: a plain Flower ClientApp (no GuardedTuning code in
its handler) under ``secagg_mod`` and the ``SecureAggregation`` wrapper, driven by Flower's own
``Strategy.start()`` over the in-process grid (fast tier: no Ray, no model)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from guardedtuning.strategies.fedavg import AdapterFedAvg
from guardedtuning.strategies.secagg import secagg_mod
from guardedtuning.strategies.secagg.mod import in_training
from guardedtuning.strategies.secure import SecureAggregation
from guardedtuning.wire.exchange import exchange
from tests.local_grid import LocalGrid

SHAPES = {"w": (6, 5), "b": (5,)}
SIZE = 35


def plain_app(*, mods: list | None = None) -> ClientApp:
    """A plain Flower ClientApp: numpy weights in, new weights (``arrays``) and ``num-examples`` out.

    Its "training" pulls the weights towards a client-specific target, so clients differ and
    the average depends on the weights (``num-examples``).
    """
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        arrays = msg.content["arrays"]
        node = context.node_id
        target = np.random.default_rng(node).uniform(-1, 1, SIZE).astype(np.float32)
        new, start = {}, 0
        for k in sorted(arrays.keys()):
            w = arrays[k].numpy()
            new[k] = w + 0.02 * (target[start:start + w.size].reshape(w.shape) - w)
            start += w.size
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in new.items()}),
                                   "metrics": MetricRecord({"num-examples": 1 + node % 4})}), reply_to=msg)

    return app


def plus_app(step: float, *, mods: list) -> ClientApp:
    """A plain Flower ClientApp that adds ``step`` to every weight."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        a = msg.content["arrays"]
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(a[k].numpy() + np.float32(step))
                                                          for k in a.keys()}),
                                   "metrics": MetricRecord({"num-examples": 2})}), reply_to=msg)

    return app


def zeros() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def fedavg() -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)


def test_plain_flower_clientapp_under_the_secure_wrapper_equals_plain_fedavg():
    plain = fedavg().start(LocalGrid(plain_app(), 5, {}), zeros(), num_rounds=3, timeout=5)
    secure = SecureAggregation(fedavg(), num_sampled_clients=5, seed=7, density=1.0, bits=16, clip=0.05,
                               max_weight=8, timeout=5.0)
    grid = LocalGrid(plain_app(mods=[secagg_mod]), 5, {})
    result = secure.start(grid, zeros(), num_rounds=3, timeout=5)
    step = 0.05 / (2 ** 15 - 1)  # one quantization step of the sent values
    for k in SHAPES:
        got, want = result.arrays[k].numpy(), plain.arrays[k].numpy()
        assert np.abs(want).max() > 50 * step  # the model moved: the comparison is not trivial
        np.testing.assert_allclose(got, want, rtol=0, atol=3 * step)  # 3 rounds, error feedback
    assert all(result.train_metrics_clientapp[r]["clients"] == 5 for r in (1, 2, 3))
    assert all(result.train_metrics_clientapp[r]["refused"] == 0 for r in (1, 2, 3))
    assert secure.rejections == []
    # no training reply carried the new weights or the example count in the clear
    trained = [m for m in grid.received if "secagg-masked" in m.content]
    assert len(trained) == 15
    assert all("arrays" not in m.content and "num-examples" not in m.content["metrics"] for m in trained)
    assert not any(in_training(grid.contexts[n].state) for n in grid.node_ids)


def test_three_rounds_of_plus_one_hundredth_end_at_three_hundredths():
    for inner in (fedavg(), AdapterFedAvg(clients_per_round=4, seed=0)):
        secure = SecureAggregation(inner, num_sampled_clients=4, seed=1, density=1.0, bits=8, clip=0.02, timeout=5.0)
        result = secure.start(LocalGrid(plus_app(0.01, mods=[secagg_mod]), 4, {}), zeros(), num_rounds=3, timeout=5)
        step = 0.02 / 127
        for k in SHAPES:
            np.testing.assert_allclose(result.arrays[k].numpy(), 0.03, rtol=0, atol=3 * step)


def test_the_mod_leaves_plain_rounds_alone():
    a = fedavg().start(LocalGrid(plain_app(), 3, {}), zeros(), num_rounds=2, timeout=5)
    b = fedavg().start(LocalGrid(plain_app(mods=[secagg_mod]), 3, {}), zeros(), num_rounds=2, timeout=5)
    for k in SHAPES:
        np.testing.assert_allclose(a.arrays[k].numpy(), b.arrays[k].numpy(), rtol=1e-6)  # FedAvg's sum order varies


def test_a_multi_message_round_seals_only_the_reply_that_carries_the_update():
    """Split learning's shape: several messages a round; only the last reply carries ``update``."""
    app = ClientApp(mods=[secagg_mod])
    sealed_steps = []

    @app.train("steps")
    def steps(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        cfg = msg.content["config"]
        if "arrays" in msg.content:
            context.state["w"] = msg.content["arrays"]
        if int(cfg["step"]) < 2:
            return Message(RecordDict({"acts": ArrayRecord({"h": Array(np.ones(3, np.float32))})}), reply_to=msg)
        w = context.state["w"]
        return Message(RecordDict({"update": ArrayRecord({k: Array(np.full(w[k].shape, 0.01, np.float32))
                                                          for k in w.keys()}),
                                   "metrics": MetricRecord({"num-examples": 3})}), reply_to=msg)

    grid = LocalGrid(app, 4, {})
    secure = SecureAggregation(AdapterFedAvg(clients_per_round=4, seed=0, message_type="train.steps"),
                               num_sampled_clients=4, density=1.0, bits=8, clip=0.02, timeout=5.0)
    msgs = list(secure.configure_train(1, zeros(), ConfigRecord({"step": 0}), grid))
    assert {m.metadata.message_type for m in grid.sent} == {"train.steps"}  # stages ride on the round's type
    ex = exchange(grid, msgs, timeout=5, poll=0.002)
    for step in (1, 2):
        assert all("acts" in r.content and "secagg-masked" not in r.content for r in ex.replies.values())
        ex = exchange(grid, [Message(RecordDict({"config": ConfigRecord({"step": step})}), dst_node_id=n,
                                     message_type="train.steps") for n in ex.replies], timeout=5, poll=0.002)
        sealed_steps.append(all("secagg-masked" in r.content for r in ex.replies.values()))
    assert sealed_steps == [False, True]
    avg, metrics = secure.aggregate_train(1, ex.replies.values())
    assert metrics["clients"] == 4
    for k in SHAPES:
        np.testing.assert_allclose(avg[k].numpy(), 0.01, atol=0.02 / 127)


def test_a_reply_that_does_not_match_the_global_is_not_sent_and_the_round_goes_on():
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        a = msg.content["arrays"]
        names = {k: ("renamed" if context.node_id == 1001 and k == "b" else k) for k in a.keys()}
        return Message(RecordDict({"update": ArrayRecord({names[k]: Array(np.full(a[k].numpy().shape, 0.01,
                                                                                  np.float32)) for k in a.keys()}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = LocalGrid(app, 4, {})
    secure = SecureAggregation(AdapterFedAvg(clients_per_round=4, seed=0), num_sampled_clients=4, density=1.0,
                               bits=8, clip=0.02, timeout=5.0)
    ex = exchange(grid, secure.configure_train(1, zeros(), ConfigRecord({}), grid), timeout=5, poll=0.002)
    assert ex.replies[1001].has_error() and "does not match the global arrays" in ex.replies[1001].error.reason
    avg, metrics = secure.aggregate_train(1, ex.replies.values())
    assert metrics["clients"] == 3 and metrics["dropped"] == 1
    assert any("node 1001" in r and "does not match" in r for r in secure.rejections)
    np.testing.assert_allclose(avg["w"].numpy(), 0.01, atol=0.02 / 127)


def test_importing_the_secagg_package_does_not_import_torch():
    code = ("import sys; import guardedtuning.strategies.secagg as s; "
            "from guardedtuning.strategies.secagg import secagg_mod; "
            "assert callable(secagg_mod); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_one_client_shifts_the_secure_mean_by_at_most_its_clip_and_max_weight():
    """The bound docs/privacy-evaluation.md states: a client running the shipped mod, sending +1e6 with
    num-examples 1e12, moves each coordinate of the mean by at most 2 * clip * M / (M + W)."""
    # M = 1 makes the bound (0.008) tighter than an uncapped 1e12 weight would keep (~0.01)
    clip, max_weight, honest_step, honest_weight = 0.02, 1, 0.01, 1.0
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        a = msg.content["arrays"]
        bad = context.node_id == 1000
        step, weight = (1e6, 1e12) if bad else (honest_step, honest_weight)
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(a[k].numpy() + np.float32(step))
                                                          for k in a.keys()}),
                                   "metrics": MetricRecord({"num-examples": weight})}), reply_to=msg)

    secure = SecureAggregation(fedavg(), num_sampled_clients=5, seed=3, density=1.0, bits=8, clip=clip,
                               max_weight=max_weight, timeout=5.0)
    result = secure.start(LocalGrid(app, 5, {}), zeros(), num_rounds=1, timeout=5)
    assert result.train_metrics_clientapp[1]["clients"] == 5  # the attacker's reply was aggregated
    total = 4 * honest_weight
    bound = 2 * clip * max_weight / (max_weight + total)
    quant = clip / 127
    for k in SHAPES:
        shift = np.abs(result.arrays[k].numpy() - honest_step)
        assert shift.max() <= bound + quant
        assert shift.min() >= 0.5 * (clip - honest_step) * max_weight / (max_weight + total)  # it did push
