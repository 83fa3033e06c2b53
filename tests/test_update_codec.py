"""The adapter-update codec's levers (issue 13): a support restricted to LoRA's B (and every non-LoRA
tensor), top-k of the public aggregate, low bits with error feedback; checked under secure aggregation
through LocalGrid with a fake ClientApp under the secure-aggregation mod (no Ray, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardedtuning import codecs as C
from guardedtuning.config import build_config
from guardedtuning.errors import ConfigError
from guardedtuning.strategies.secagg.mod import SecAggMod
from guardedtuning.strategies.secure import SecureSparseFedAvg
from guardedtuning.wire.exchange import exchange
from guardedtuning.wire.records import message_nbytes
from tests.local_grid import LocalGrid

SHAPES = {"head.bias": (3,), "head.weight": (3, 8),
          "layer.0.query.lora_A.default.weight": (4, 8), "layer.0.query.lora_B.default.weight": (8, 4),
          "layer.1.value.lora_A.default.weight": (4, 8), "layer.1.value.lora_B.default.weight": (8, 4)}
SIZE = sum(int(np.prod(s)) for s in SHAPES.values())  # 155
SEED = bytes(range(32))


def a_coordinates() -> np.ndarray:
    """Flat (sorted-name) indices of the lora_A tensors."""
    out, start = [], 0
    for name in sorted(SHAPES):
        n = int(np.prod(SHAPES[name]))
        if ".lora_A." in name:
            out.extend(range(start, start + n))
        start += n
    return np.asarray(out)


def update_of(node: int, round_: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node * 1000 + round_)
    return {k: rng.normal(0, scale, s).astype(np.float32) for k, s in SHAPES.items()}


def fake_app(scale: float, *, bad_node: int | None = None, omit_a: bool = False) -> ClientApp:
    """Replies with a seeded fake update (``bad_node``: one tensor of the wrong shape; ``omit_a``: without
    the LoRA A tensors, as a client that froze them replies); the mod seals it."""
    app = ClientApp(mods=[SecAggMod(rounding_seed=lambda node, round_: node * 7 + round_)])

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        update = update_of(context.node_id, int(msg.content["config"]["server-round"]), scale)
        if context.node_id == bad_node:
            update["head.bias"] = np.zeros(4, np.float32)
        if omit_a:
            update = {k: v for k, v in update.items() if ".lora_A." not in k}
        return Message(RecordDict({
            "update": ArrayRecord({k: Array(v) for k, v in update.items()}),
            "metrics": MetricRecord({"compute_s": 0.0, "num-examples": 10 + context.node_id % 5})}), reply_to=msg)

    return app


def global_arrays() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def secure_round(strategy: SecureSparseFedAvg, grid: LocalGrid, round_: int):  # type: ignore[no-untyped-def]
    msgs = list(strategy.configure_train(round_, global_arrays(), ConfigRecord({"server-round": round_}), grid))
    setup = [m.content["secagg-setup"] for m in grid.sent
             if "secagg-setup" in m.content and m.content["secagg-stage"]["server-round"] == round_]
    support = setup[0]["support"].numpy().astype(np.int64)
    assert all(np.array_equal(s["support"].numpy(), setup[0]["support"].numpy()) for s in setup)
    ex = exchange(grid, msgs, timeout=0.2, poll=0.002)
    avg, metrics = strategy.aggregate_train(round_, ex.replies.values())
    return support, avg, metrics, ex


# ---------------------------------------------------------------------------- the support's scope

def test_eligible_coordinates_leave_out_lora_a_only():
    every = C.eligible_coordinates(SHAPES, scope="all")
    assert np.array_equal(every, np.arange(SIZE))
    b_only = C.eligible_coordinates(SHAPES, scope="lora-b")
    assert set(b_only.tolist()) == set(range(SIZE)) - set(a_coordinates().tolist())
    assert b_only.size == SIZE - 64  # two 4x8 A matrices out; the head and both B matrices in
    with pytest.raises(ValueError, match="scope.*'lora-c'.*`all` or `lora-b`"):
        C.eligible_coordinates(SHAPES, scope="lora-c")
    with pytest.raises(ValueError, match="no coordinate"):
        C.eligible_coordinates({"x.lora_A.default.weight": (2, 2)}, scope="lora-b")


def test_top_k_support_stays_among_the_candidates_and_caps_k():
    cand = C.eligible_coordinates(SHAPES, scope="lora-b")
    score = np.zeros(SIZE)
    score[a_coordinates()] = 100.0  # the largest public scores lie on A: they must not be chosen
    score[cand[:5]] = [5.0, 4.0, 3.0, 2.0, 1.0]
    sup = C.top_k_support(score=score, density=0.2, explore=0.5, seed=SEED, candidates=cand)
    assert sup.size == C.support_size(size=SIZE, density=0.2) and set(sup.tolist()) <= set(cand.tolist())
    k_top = sup.size - round(0.5 * sup.size)
    assert set(cand[:min(5, k_top)].tolist()) <= set(sup.tolist())
    assert np.array_equal(sup, C.top_k_support(score=score, density=0.2, explore=0.5, seed=SEED, candidates=cand))
    whole = C.top_k_support(score=score, density=1.0, explore=0.0, seed=SEED, candidates=cand)
    assert np.array_equal(whole, cand)  # density 1 over a scope: every candidate, never more


def dense_head() -> np.ndarray:
    """Flat indices of the head (the tensors that are not LoRA's): 27 of 155."""
    out, start = [], 0
    for name in sorted(SHAPES):
        n = int(np.prod(SHAPES[name]))
        if "lora_" not in name:
            out.extend(range(start, start + n))
        start += n
    return np.asarray(out)


def test_dense_rest_keeps_every_non_lora_coordinate_on_the_support():
    assert np.array_equal(C.dense_coordinates(SHAPES), dense_head())
    cand = C.eligible_coordinates(SHAPES, scope="lora-b")
    score = np.zeros(SIZE)
    score[cand[-6:]] = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # the largest public scores lie on B
    sup = C.top_k_support(score=score, density=0.25, explore=0.0, seed=SEED, candidates=cand,
                          always=C.dense_coordinates(SHAPES))
    assert sup.size == C.support_size(size=SIZE, density=0.25)  # 39: the head's 27 and B's top 12
    assert set(dense_head().tolist()) <= set(sup.tolist()) and set(sup.tolist()) <= set(cand.tolist())
    assert set(cand[-6:].tolist()) <= set(sup.tolist())
    with pytest.raises(ValueError, match=r"27 coordinates must always be sent but the support holds 8.*0\.1742"):
        C.top_k_support(score=score, density=0.05, explore=0.0, seed=SEED, always=C.dense_coordinates(SHAPES))


def test_dense_rest_reaches_the_plaintext_sum_and_a_too_small_density_is_a_config_error():
    clients = 4
    grid = LocalGrid(fake_app(0.02, omit_a=True), clients, {})
    strategy = SecureSparseFedAvg(clients_per_round=clients, seed=2, density=0.3, bits=2, clip=0.05, support="topk",
                                  scope="lora-b", dense_rest=True, max_weight=16, timeout=0.2)
    residual: dict[int, np.ndarray | None] = dict.fromkeys(grid.node_ids)
    for round_ in (1, 2):
        support, avg, metrics, _ = secure_round(strategy, grid, round_)
        assert avg is not None and metrics["clients"] == clients
        assert set(dense_head().tolist()) <= set(support.tolist())
        assert not set(a_coordinates().tolist()) & set(support.tolist())
        total, weight = np.zeros(SIZE), 0
        for v in grid.node_ids:
            upd = {k: (np.zeros_like(x) if ".lora_A." in k else x) for k, x in update_of(v, round_, 0.02).items()}
            comp = C.compress_update(update=C.flatten(upd), residual=residual[v], support=support, bits=2, clip=0.05,
                                     rng=np.random.default_rng(v * 7 + round_))
            residual[v] = comp.residual.astype(np.float32).astype(np.float64)
            w = min(16, 10 + v % 5)
            total, weight = total + w * comp.sent, weight + w
        np.testing.assert_allclose(C.flatten({k: avg[k].numpy() for k in SHAPES}), total / weight, rtol=1e-5,
                                   atol=1e-7)
    small = SecureSparseFedAvg(clients_per_round=clients, seed=2, density=0.05, bits=2, clip=0.05, support="topk",
                               scope="lora-b", dense_rest=True, timeout=0.2)
    with pytest.raises(ConfigError, match=r"aggregation\.dense-rest.*raise `density` to at least"):
        secure_round(small, LocalGrid(fake_app(0.02, omit_a=True), clients, {}), 1)
    with pytest.raises(ConfigError, match=r"aggregation\.dense-rest.*aggregation\.support=topk"):
        build_config({"aggregation.secure": True, "aggregation.support": "rand", "aggregation.dense-rest": True})


# ---------------------------------------------------------------------------- under secure aggregation

@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.integers(2, 8), density=st.sampled_from([0.05, 0.2, 0.6]), explore=st.sampled_from([0.0, 0.5, 1.0]),
       scope=st.sampled_from(["all", "lora-b"]), scale=st.sampled_from([0.005, 0.05]), clients=st.integers(3, 5),
       packing=st.sampled_from(["bits", "word"]))
def test_the_codec_reaches_the_plaintext_sum_under_secure_aggregation(bits, density, explore, scope, scale, clients,
                                                                      packing):
    """Two rounds: the unmasked mean equals the plaintext weighted mean of what each client's codec
    sent (its residual carried from round 1), on the server's public support, never on A under lora-b;
    the masked vector travels as raw bytes, bit-packed or as words."""
    grid = LocalGrid(fake_app(scale), clients, {})
    strategy = SecureSparseFedAvg(clients_per_round=clients, seed=3, density=density, bits=bits, clip=0.05,
                                  support="topk", explore=explore, scope=scope, max_weight=16, packing=packing,
                                  timeout=0.2)
    residual: dict[int, np.ndarray | None] = dict.fromkeys(grid.node_ids)
    cand = C.eligible_coordinates(SHAPES, scope=scope)
    for round_ in (1, 2):
        support, avg, metrics, _ = secure_round(strategy, grid, round_)
        assert avg is not None and metrics["clients"] == clients
        assert set(support.tolist()) <= set(cand.tolist())
        assert metrics["support-size"] == support.size
        total, weight = np.zeros(SIZE), 0
        for v in grid.node_ids:
            comp = C.compress_update(update=C.flatten(update_of(v, round_, scale)), residual=residual[v],
                                     support=support, bits=bits, clip=0.05,
                                     rng=np.random.default_rng(v * 7 + round_))
            residual[v] = comp.residual.astype(np.float32).astype(np.float64)  # the mod keeps it as float32
            w = min(16, 10 + v % 5)
            total, weight = total + w * comp.sent, weight + w
        got = C.flatten({k: avg[k].numpy() for k in SHAPES})
        np.testing.assert_allclose(got, total / weight, rtol=1e-5, atol=1e-7)
        if scope == "lora-b":
            assert not got[a_coordinates()].any()  # the global A never moves


def test_error_feedback_keeps_what_a_scoped_support_never_sends():
    """The codec alone: the residual is the whole unsent update, on A (never eligible) the sum of every
    round's A update; everywhere, sent + residual == update + old residual. (A client under lora-b
    freezes A and leaves it out of its update, so it keeps no residual there: see the next test.)"""
    cand = C.eligible_coordinates(SHAPES, scope="lora-b")
    residual, a_sum = None, np.zeros(SIZE)
    for round_ in (1, 2, 3):
        upd = C.flatten(update_of(1001, round_, 0.02))
        sup = C.top_k_support(score=np.zeros(SIZE), density=0.3, explore=1.0, seed=bytes([round_]) * 32,
                              candidates=cand)
        comp = C.compress_update(update=upd, residual=residual, support=sup, bits=2, clip=0.05,
                                 rng=np.random.default_rng(round_))
        before = upd + (0 if residual is None else residual)
        np.testing.assert_allclose(comp.sent + comp.residual, before, atol=1e-12)
        a_sum += upd
        np.testing.assert_allclose(comp.residual[a_coordinates()], a_sum[a_coordinates()], atol=1e-12)
        assert not comp.sent[a_coordinates()].any()
        residual = comp.residual


def test_a_frozen_tensor_left_out_of_the_update_counts_as_zero_and_keeps_no_residual():
    """Clients that froze LoRA's A (scope lora-b) reply without it: the mod takes A's update as zero, the
    aggregate is still the plaintext mean of what the codecs sent, and no residual is kept on A."""
    clients = 4
    grid = LocalGrid(fake_app(0.02, omit_a=True), clients, {})
    strategy = SecureSparseFedAvg(clients_per_round=clients, seed=1, density=0.3, bits=2, clip=0.05, support="topk",
                                  explore=0.5, scope="lora-b", max_weight=16, timeout=0.2)
    residual: dict[int, np.ndarray | None] = dict.fromkeys(grid.node_ids)
    for round_ in (1, 2):
        support, avg, metrics, _ = secure_round(strategy, grid, round_)
        assert avg is not None and metrics["clients"] == clients and not strategy.rejections
        total, weight = np.zeros(SIZE), 0
        for v in grid.node_ids:
            upd = update_of(v, round_, 0.02)
            upd = {k: (np.zeros_like(x) if ".lora_A." in k else x) for k, x in upd.items()}
            comp = C.compress_update(update=C.flatten(upd), residual=residual[v], support=support, bits=2, clip=0.05,
                                     rng=np.random.default_rng(v * 7 + round_))
            residual[v] = comp.residual.astype(np.float32).astype(np.float64)
            w = min(16, 10 + v % 5)
            total, weight = total + w * comp.sent, weight + w
        got = C.flatten({k: avg[k].numpy() for k in SHAPES})
        np.testing.assert_allclose(got, total / weight, rtol=1e-5, atol=1e-7)
        assert not got[a_coordinates()].any()
    for ctx in grid.contexts.values():
        kept = ctx.state["secagg.residual"]["residual"].numpy()
        assert kept.size == SIZE and not kept[a_coordinates()].any() and kept.any()


def test_an_update_leaving_out_a_tensor_on_the_support_is_rejected():
    """Under scope all the support may hold A: a client that left A out would silently send zeros there."""
    grid = LocalGrid(fake_app(0.02, omit_a=True), 4, {})
    strategy = SecureSparseFedAvg(clients_per_round=4, seed=0, density=1.0, bits=2, clip=0.05, support="topk",
                                  scope="all", timeout=0.2)
    _, avg, _, _ = secure_round(strategy, grid, 1)
    assert avg is None
    assert any("lora_A" in r and "aggregation.scope=lora-b" in r for r in strategy.rejections)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_low_bit_quantize_dequantize_error_is_within_half_a_step(bits):
    h = 2 ** (bits - 1) - 1
    x = np.random.default_rng(bits).uniform(-0.05, 0.05, 10_000)
    err = np.abs(C.dequantize(C.quantize(x, bits=bits, clip=0.05), bits=bits, clip=0.05) - x)
    assert err.max() <= 0.5 * 0.05 / h + 1e-12
    # stochastic rounding: within one step, and unbiased on average
    rng = np.random.default_rng(0)
    y = np.full(20_000, 0.3 * 0.05 / h)
    sto = C.dequantize(C.quantize(y, bits=bits, clip=0.05, rng=rng), bits=bits, clip=0.05)
    assert np.abs(sto - y).max() <= 0.05 / h + 1e-12
    assert abs(sto.mean() - y[0]) < 0.05 * (0.05 / h)


def test_bytes_accounting_equals_the_payload_length_of_a_scoped_low_bit_round():
    grid = LocalGrid(fake_app(0.02), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.2, bits=2, clip=0.05, support="topk",
                                  scope="lora-b", max_weight=1, timeout=0.2)
    support, _, metrics, ex = secure_round(strategy, grid, 1)
    stage_msgs = [m for m in grid.sent if "secagg-stage" in m.content and
                  m.content["secagg-stage"]["stage"] in ("advertise", "share-keys", "consistency", "unmask")]
    stage_replies = [r for r in grid.received if "secagg-stage" in r.content and
                     r.content["secagg-stage"]["stage"] in ("advertise", "share-keys", "consistency", "unmask")]
    assert metrics["secagg-bytes-down"] == sum(message_nbytes(m) for m in stage_msgs)
    assert metrics["secagg-bytes-up"] == sum(message_nbytes(r) for r in stage_replies)
    m_bits = (5 * 1 * 2).bit_length()  # 5 clients, weight 1, 2-bit levels in [0, 2]: 4 bits a value
    for reply in ex.replies.values():
        y = reply.content["secagg-masked"]["y"]  # raw bytes (wire.raw_array): exactly the packed stream
        assert y.stype == "raw" and np.dtype(y.dtype) == np.uint8
        assert len(y.data) == -(-(support.size + 1) * m_bits // 8)


def test_a_malformed_update_is_rejected_and_the_round_goes_on():
    grid = LocalGrid(fake_app(0.02, bad_node=1002), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.2, bits=2, clip=0.05, support="topk",
                                  scope="lora-b", timeout=0.2)
    _, avg, metrics, _ = secure_round(strategy, grid, 1)
    assert any("node 1002" in r and "does not match the global arrays" in r for r in strategy.rejections)
    assert avg is not None and metrics["clients"] == 4 and metrics["refused"] == 0


# ---------------------------------------------------------------------------- the config

def test_scope_is_a_validated_config_key():
    cfg = build_config({"aggregation.secure": True, "aggregation.support": "topk", "aggregation.scope": "lora-b"})
    assert cfg.aggregation.scope == "lora-b"
    assert build_config({}).aggregation.scope == "all"
    with pytest.raises(ConfigError, match=r"aggregation\.scope.*`all` or `lora-b`.*'lora-a'"):
        build_config({"aggregation.scope": "lora-a"})
    with pytest.raises(ConfigError, match=r"aggregation\.scope.*aggregation\.support=topk.*'lora-b'"):
        build_config({"aggregation.secure": True, "aggregation.support": "rand", "aggregation.scope": "lora-b"})
    with pytest.raises(ValueError, match="scope"):
        SecureSparseFedAvg(clients_per_round=5, seed=0, support="rand", scope="lora-b")
