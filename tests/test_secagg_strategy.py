"""SecureSparseFedAvg (AdapterFedAvg under SecureAggregation) end to end through LocalGrid, with a
small fake ClientApp under the secure-aggregation mod (no Ray, no model)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from guardedtuning import codecs as C
from guardedtuning.strategies.secagg.mod import SecAggMod, in_training
from guardedtuning.strategies.secure import SecureSparseFedAvg
from guardedtuning.wire.exchange import exchange
from guardedtuning.wire.records import message_nbytes
from tests.local_grid import LocalGrid

SHAPES = {"layer.0.lora_A": (4, 24), "layer.0.lora_B": (24, 4), "layer.1.lora_A": (4, 24), "layer.1.lora_B": (24, 4)}
SIZE = sum(int(np.prod(s)) for s in SHAPES.values())  # 384


def fake_update(node: int, round_: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node * 1000 + round_)
    return {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in SHAPES.items()}


def fake_app(*, nan_node: int | None = None) -> ClientApp:
    """Trains nothing: replies with a seeded fake update; the mod seals it (seeded rounding)."""
    app = ClientApp(mods=[SecAggMod(rounding_seed=lambda node, _round: node)])

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        glob = msg.content["arrays"]
        assert set(glob.keys()) == set(SHAPES) and all(glob[k].numpy().dtype == np.float32 for k in SHAPES)
        assert "secagg-stage" not in msg.content and "arrays-codec" not in msg.content  # the app sees plain Flower
        update = fake_update(context.node_id, int(msg.content["config"]["server-round"]))
        if context.node_id == nan_node:
            update["layer.0.lora_A"][0, 0] = np.nan
        return Message(RecordDict({
            "update": ArrayRecord({k: Array(v) for k, v in update.items()}),
            "metrics": MetricRecord({"compute_s": 0.0, "num-examples": 10 + context.node_id % 7})}), reply_to=msg)

    return app


STAGES = ("advertise", "share-keys", "consistency", "unmask")  # the stage messages (collect-masked rides on training)


def stage_name(msg: Message) -> str | None:
    if msg.has_error() or "secagg-stage" not in msg.content:
        return None
    return msg.content["secagg-stage"]["stage"]


def expected_mean(strategy: SecureSparseFedAvg, nodes, round_: int, residuals=None) -> dict[str, np.ndarray]:
    """The plaintext weighted mean of what the survivors sent (same support, same seeded rounding)."""
    support = C.rand_k_support(size=SIZE, density=strategy.density, seed=strategy.round_seed(round_))
    total, weight = np.zeros(SIZE), 0
    for v in nodes:
        comp = C.compress_update(update=C.flatten(fake_update(v, round_)), residual=(residuals or {}).get(v),
                                 support=support, bits=strategy.bits, clip=strategy.clip,
                                 rng=np.random.default_rng(v))
        w = min(strategy.max_weight, 10 + v % 7)
        total += w * comp.sent
        weight += w
    return C.unflatten(total / weight, shapes=SHAPES)


class Recorder:
    """Tamper hook: drops chosen replies, records every reply's serialized size."""

    def __init__(self, drop_stage: str | None = None, drop_nodes: set[int] | None = None) -> None:
        self.drop_stage, self.drop_nodes = drop_stage, drop_nodes or set()
        self.up: list[int] = []

    def __call__(self, node: int, request: Message, reply: Message) -> Message | None:
        stage = stage_name(reply)
        if stage == self.drop_stage and node in self.drop_nodes:
            return None  # never arrives: the exchange times out on it
        if stage in STAGES:
            self.up.append(message_nbytes(reply))
        return reply


def global_arrays() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def run_one_round(strategy, grid, round_=1):  # type: ignore[no-untyped-def]
    """What a driver does: configure (the key stages run here), the training exchange, aggregate_train."""
    msgs = list(strategy.configure_train(round_, global_arrays(), ConfigRecord({"local-steps": 1}), grid))
    ex = exchange(grid, msgs, timeout=0.2, poll=0.002)
    return msgs, ex, strategy.aggregate_train(round_, ex.replies.values())


def _close(got: ArrayRecord, want: dict[str, np.ndarray]) -> None:
    for k in SHAPES:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-5, atol=1e-8)


def test_five_clients_one_dropped_mid_round_runs_to_the_end(caplog):
    rec = Recorder(drop_stage="collect-masked", drop_nodes={1002})
    grid = LocalGrid(fake_app(), 5, {}, tamper=rec)
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, bits=8, clip=0.05, timeout=0.2)
    with caplog.at_level(logging.WARNING):
        msgs, ex, (avg, metrics) = run_one_round(strategy, grid)
    assert len(msgs) == 5 and list(ex.failures()) == [1002]  # its sealed training reply never arrives
    assert avg is not None and metrics["refused"] == 0
    assert metrics["clients"] == 4 and metrics["dropped"] == 1
    unmask = [m for m in grid.sent if stage_name(m) == "unmask"]  # the survivors remove 1002's pair masks
    assert len(unmask) == 4 and all(1002 in m.content["secagg-stage"]["dropped"] for m in unmask)
    _close(avg, expected_mean(strategy, [1000, 1001, 1003, 1004], 1))
    # the update is zero off the public support
    flat = C.flatten({k: avg[k].numpy() for k in SHAPES})
    support = C.rand_k_support(size=SIZE, density=0.1, seed=strategy.round_seed(1))
    assert not np.delete(flat, support).any()


def test_no_reply_the_server_sees_holds_the_update():
    grid = LocalGrid(fake_app(), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, timeout=0.2)
    _, ex, (avg, _) = run_one_round(strategy, grid)
    assert avg is not None and len(ex.replies) == 5
    for reply in grid.received:
        assert not reply.has_error()
        assert "update" not in reply.content and "arrays" not in reply.content
        assert "num-examples" not in reply.content.get("metrics", {})
    for reply in ex.replies.values():  # the sealed training reply: the masked vector, the stage, the metrics
        assert set(reply.content.keys()) == {"secagg-masked", "secagg-stage", "metrics"}
        assert stage_name(reply) == "collect-masked"
    adverts = [m for m in grid.received if stage_name(m) == "advertise"]
    assert len(adverts) == 5
    assert all(set(m.content["secagg-stage"].keys()) == {"stage", "server-round", "c-pk", "s-pk", "id-pk", "sig"}
               for m in adverts)


def test_two_rounds_carry_the_residual_and_stay_exact():
    grid = LocalGrid(fake_app(), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=3, density=0.1, timeout=0.2)
    run_one_round(strategy, grid, 1)
    residuals = {n: grid.contexts[n].state["secagg.residual"]["residual"].numpy().astype(np.float64)
                 for n in grid.node_ids}
    _, _, (avg, metrics) = run_one_round(strategy, grid, 2)
    assert metrics["clients"] == 5
    _close(avg, expected_mean(strategy, grid.node_ids, 2, residuals))
    assert all("secagg.client" not in grid.contexts[n].state for n in grid.node_ids)  # round state dropped
    assert not any(in_training(grid.contexts[n].state) for n in grid.node_ids)
    assert all("secagg.global" not in grid.contexts[n].state for n in grid.node_ids)
    assert all("secagg.residual" in grid.contexts[n].state for n in grid.node_ids)  # the residual stays


def test_below_threshold_the_round_is_skipped_and_reported():
    rec = Recorder(drop_stage="collect-masked", drop_nodes={1000, 1001, 1002})  # t = 3 of 5
    grid = LocalGrid(fake_app(), 5, {}, tamper=rec)
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, timeout=0.1)
    _, _, (avg, metrics) = run_one_round(strategy, grid)
    assert avg is None and metrics["refused"] == 1
    # nothing was revealed: the unmask stage never ran
    assert not [m for m in grid.sent if stage_name(m) == "unmask"]


def test_nan_update_is_refused_on_the_client_and_the_round_goes_on():
    grid = LocalGrid(fake_app(nan_node=1003), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, timeout=0.2)
    _, _, (avg, metrics) = run_one_round(strategy, grid)
    assert any("node 1003" in r and "NaN" in r for r in strategy.rejections)
    assert metrics["clients"] == 4
    _close(avg, expected_mean(strategy, [1000, 1001, 1002, 1004], 1))


def test_duplicate_final_replies_reject_the_node():
    grid = LocalGrid(fake_app(), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, timeout=0.2)
    msgs = list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), grid))
    ex = exchange(grid, msgs, timeout=0.2, poll=0.002)
    replies = [*ex.replies.values(), ex.replies[1001]]
    avg, metrics = strategy.aggregate_train(1, replies)
    assert any("node 1001" in r and "2 final replies" in r for r in strategy.rejections)
    assert metrics["clients"] == 4
    _close(avg, expected_mean(strategy, [1000, 1002, 1003, 1004], 1))


def test_a_reply_to_the_wrong_stage_is_rejected():
    def tamper(node: int, request: Message, reply: Message) -> Message:
        if node == 1004 and "secagg-stage" in reply.content and \
                reply.content["secagg-stage"]["stage"] == "share-keys":
            reply.content["secagg-stage"]["stage"] = "unmask"
        return reply

    grid = LocalGrid(fake_app(), 5, {}, tamper=tamper)
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, timeout=0.2)
    _, _, (avg, metrics) = run_one_round(strategy, grid)
    assert any("node 1004" in r and "a stage was missed" in r for r in strategy.rejections)
    _close(avg, expected_mean(strategy, [1000, 1001, 1002, 1003], 1))


def test_bytes_accounting_equals_the_serialized_payloads():
    rec = Recorder()
    grid = LocalGrid(fake_app(), 5, {}, tamper=rec)
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, timeout=0.2)
    _, _, (_, metrics) = run_one_round(strategy, grid)
    stage_msgs = [m for m in grid.sent if stage_name(m) in STAGES]
    assert len(stage_msgs) == 20 and len(rec.up) == 20  # 4 stages x 5 clients
    assert metrics["secagg-bytes-down"] == sum(message_nbytes(m) for m in stage_msgs)
    assert metrics["secagg-bytes-up"] == sum(rec.up)
    assert metrics["dense-bytes"] == 5 * 4 * SIZE


def test_masked_upload_uses_the_smallest_word():
    sizes = {}
    for packing in ("word", "bits"):
        grid = LocalGrid(fake_app(), 5, {})
        strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, max_weight=16, packing=packing,
                                      timeout=0.2)
        _, ex, (avg, _) = run_one_round(strategy, grid)
        masked = [r.content["secagg-masked"]["y"] for r in ex.replies.values()]
        m_bits = (5 * 16 * 254).bit_length()  # 15 bits: uint16
        assert avg is not None and len(masked) == 5
        k = C.support_size(size=SIZE, density=0.1)
        want = (np.dtype(np.uint16), k + 1) if packing == "word" else (np.dtype(np.uint8), -(-(k + 1) * m_bits // 8))
        assert {(np.dtype(a.dtype), len(a.data) // np.dtype(a.dtype).itemsize) for a in masked} == {want}  # raw bytes
        sizes[packing] = len(masked[0].data)
    assert sizes["bits"] < sizes["word"]


def test_topk_support_and_downlink_quantization():
    grid = LocalGrid(fake_app(), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=1, density=0.1, support="topk", explore=0.5,
                                  downlink_bits=8, timeout=0.2)

    def one_round(r):  # type: ignore[no-untyped-def]
        msgs = list(strategy.configure_train(r, global_arrays(), ConfigRecord({}), grid))
        ex = exchange(grid, msgs, timeout=0.2, poll=0.002)
        assert msgs[0].content["arrays"][sorted(SHAPES)[0]].numpy().dtype == np.uint8  # the mod decoded a copy
        sup = [m.content["secagg-setup"]["support"].numpy().tolist() for m in grid.sent
               if stage_name(m) == "advertise" and m.content["secagg-stage"]["server-round"] == r]
        assert len(sup) == 5 and all(s == sup[0] for s in sup)  # one support for everyone
        return sup[0], strategy.aggregate_train(r, ex.replies.values())

    _, (avg1, _) = one_round(1)
    sup2, (avg2, m2) = one_round(2)
    flat1 = C.flatten({k: avg1[k].numpy() for k in SHAPES})
    top = np.argsort(-np.abs(flat1), kind="stable")[:10]
    assert set(top.tolist()) <= set(sup2)  # the largest public coordinates are kept
    assert avg2 is not None and m2["clients"] == 5


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clients_per_round": 1}, "clients_per_round"), ({"density": 0.0}, "density"), ({"bits": 1}, "bits"),
    ({"support": "top"}, "support"), ({"threshold": 1}, "threshold"), ({"packing": "int64"}, "packing"),
    ({"max_weight": 2**40, "bits": 32}, "max-weight"),
])
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SecureSparseFedAvg(**{"clients_per_round": 5, "seed": 0, **kwargs})


def test_threshold_above_the_share_holders_skips_the_round(caplog):
    grid = LocalGrid(fake_app(), 3, {})
    strategy = SecureSparseFedAvg(clients_per_round=3, seed=0, threshold=4)
    with caplog.at_level(logging.WARNING):
        assert list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), grid)) == []
    assert "aggregation.threshold" in caplog.text
    avg, metrics = strategy.aggregate_train(1, [])
    assert avg is None and metrics["refused"] == 1


def test_the_mod_refuses_out_of_order_use():
    from flwr.app import RecordDict

    from guardedtuning.errors import MessageError
    from guardedtuning.strategies.secagg import mod
    from guardedtuning.strategies.secagg.params import CONFIG_KEY, SETUP_KEY
    from guardedtuning.strategies.secagg.wire import AdvertiseRequest, MaskRequest, to_content

    state = RecordDict()
    request = MaskRequest(mask_with=[], srcs=[], cts=[])
    with pytest.raises(MessageError, match="advertise stage must run first"):
        mod.seal_update(fake_update(1, 1), num_examples=1, state=state, node_id=1, request=request)
    with pytest.raises(MessageError, match="advertise stage must run first"):
        mod.client_stage("share-keys", RecordDict(), state, node_id=1)
    strategy = SecureSparseFedAvg(clients_per_round=3, seed=0, timeout=0.2)
    params = strategy.round_params(1, [1000, 1001, 1002], SIZE, run_id=1)
    ask = to_content(AdvertiseRequest(), stage="advertise", server_round=1)
    ask[CONFIG_KEY], ask[SETUP_KEY] = params.to_records()
    with pytest.raises(MessageError, match="not among the round's participants"):
        mod.advertise(ask, RecordDict(), node_id=4242, run_id=1)
    with pytest.raises(MessageError, match="names run 1, but this client is in run 2"):
        mod.advertise(ask, RecordDict(), node_id=1000, run_id=2)  # the graph seed derives from the run id
    mod.advertise(ask, state, node_id=1000, run_id=1)
    with pytest.raises(MessageError, match="not a request this client answers alone"):
        mod.client_stage("collect-masked", RecordDict(), state, node_id=1000)
    training = to_content(request, stage="collect-masked", server_round=1)
    training["arrays"] = global_arrays()
    with pytest.raises(MessageError, match="expected 'shared'; a stage was missed"):
        mod.begin_training(training, state, node_id=1000)  # the share-keys stage never ran
    with pytest.raises(MessageError, match="a stage was missed"):
        mod.client_stage("unmask", to_content(request, stage="collect-masked", server_round=1), state, node_id=1000)


def test_an_app_without_the_mod_is_named_in_the_rejections():
    plain = ClientApp()

    @plain.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        return Message(RecordDict({"arrays": msg.content["arrays"] if "arrays" in msg.content else global_arrays(),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = LocalGrid(plain, 3, {})
    strategy = SecureSparseFedAvg(clients_per_round=3, seed=0, timeout=0.2)
    assert list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), grid)) == []  # refused at advertise
    assert len(strategy.rejections) >= 3 and all("secagg_mod" in r for r in strategy.rejections[:3])


def test_clients_refuse_a_server_chosen_threshold_below_their_minimum(monkeypatch):
    """A server that plans t = 2 of 5 (bypassing its own checks) gets an error reply from every client,
    naming the value and the minimum, and nothing is shared."""
    import dataclasses

    grid = LocalGrid(fake_app(), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, timeout=0.2)
    honest = strategy.round_params
    monkeypatch.setattr(strategy, "round_params", lambda *a, **kw: dataclasses.replace(honest(*a, **kw), threshold=2,
                                                                                       quorum=2))
    assert list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), grid)) == []  # refused at advertise
    assert len(strategy.rejections) == 5
    assert all("threshold 2 is below the minimum 3 for degree 4" in r for r in strategy.rejections)
    assert not [m for m in grid.sent if stage_name(m) == "share-keys"]  # no share was ever asked for


def test_identity_keys_are_pinned_across_rounds_and_a_substitution_is_refused(monkeypatch):
    """Round 1 pins every neighbour's identity key in context.state; in round 2 a server that relays
    another identity key for node 1001 (with a valid signature by it) gets error replies naming the pin.
    (The honest strategy would leave such a node out itself: that check is turned off here.)"""
    from guardedtuning.strategies.secagg import RoundParams
    from guardedtuning.strategies.secagg.keys import new_identity, round_keys_statement, sign

    grid = LocalGrid(fake_app(), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, timeout=0.2)
    run_one_round(strategy, grid, 1)
    pins = grid.contexts[1000].state["secagg.pins"]
    assert pins["nodes"] == grid.node_ids and len(set(pins["keys"])) == 5
    assert "secagg.identity" in grid.contexts[1000].state  # the long-term key outlives the round

    sk, pk = new_identity()

    def tamper(node, request, reply):  # type: ignore[no-untyped-def]
        if node == 1001 and stage_name(reply) == "advertise":  # the server swaps 1001's identity key
            cfg = reply.content["secagg-stage"]
            params = RoundParams.from_records(request.content["secagg"], request.content["secagg-setup"], source="t")
            cfg["id-pk"] = pk
            cfg["sig"] = sign(sk, round_keys_statement(context=params.context, node=1001, c_pk=cfg["c-pk"],
                                                       s_pk=cfg["s-pk"]))
        return reply

    grid.tamper = tamper
    monkeypatch.setattr(strategy, "_known_identities", lambda rnd, adverts: adverts)
    msgs = list(strategy.configure_train(2, global_arrays(), ConfigRecord({}), grid))
    refusals = [r for r in strategy.rejections if "not the identity key pinned for node 1001" in r]
    assert len(refusals) == 4  # every neighbour of 1001 refused at share-keys
    assert msgs == []  # 1001 alone is left: the round is refused


def test_a_client_that_lost_its_state_is_left_out_and_the_round_goes_on():
    """A restarted client makes a new identity key; its neighbours pinned the old one. The server leaves
    it out by name instead of relaying a key every neighbour would refuse."""
    grid = LocalGrid(fake_app(), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.1, timeout=0.2)
    run_one_round(strategy, grid, 1)
    grid.contexts[1002].state = RecordDict()  # node 1002 restarts: its identity key and pins are gone
    _, _, (avg, metrics) = run_one_round(strategy, grid, 2)
    assert any("node 1002" in r and "identity key changed" in r for r in strategy.rejections)
    assert avg is not None and metrics["clients"] == 4
    assert not [m for m in grid.received if m.has_error()]  # no client had to refuse anything
