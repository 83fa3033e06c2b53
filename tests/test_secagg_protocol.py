"""The secure-aggregation protocol in process: exact sums, dropouts, thresholds, robustness."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardedtuning import codecs as C
from guardedtuning.errors import MessageError
from guardedtuning.strategies.secagg import ClientSecAgg, RoundRefused, ServerSecAgg
from guardedtuning.strategies.secagg.keys import new_identity, round_keys_statement, sign
from guardedtuning.strategies.secagg.masking import clamp_weight, fold_weight, unpack_masked
from guardedtuning.strategies.secagg.wire import (
    SHARE_KEYS,
    MaskedReply,
    MaskRequest,
    UnmaskReply,
    UnmaskRequest,
    from_content,
    to_content,
)
from tests.secagg_rounds import HONEST_CLIENTS, make_params, random_inputs, run_round


def _sum(inputs, nodes):
    return sum(inputs[v] for v in nodes)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 6), size=st.integers(5, 120), density=st.floats(0.05, 1.0), bits=st.integers(2, 10),
       max_weight=st.integers(1, 50), stochastic=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_aggregate_equals_the_plaintext_sparse_quantized_sum(n, size, density, bits, max_weight, stochastic, seed):
    rng = np.random.default_rng(seed)
    clip = 0.1
    params = make_params(n, size=size, density=density, bits=bits, clip=clip, max_weight=max_weight,
                         tag=seed.to_bytes(4, "little"))
    updates = {v: rng.normal(0, 0.04, size) for v in params.nodes}
    weights = {v: clamp_weight(float(rng.integers(1, 100)), max_weight=max_weight) for v in params.nodes}
    comp = {v: C.compress_update(update=updates[v], residual=None, support=params.support, bits=bits, clip=clip,
                                 rng=rng if stochastic else None) for v in params.nodes}
    inputs = {v: fold_weight(comp[v].q, weight=weights[v], max_weight=max_weight) for v in params.nodes}
    result, _, _ = run_round(params, inputs)
    # exact in the field ...
    assert result.weight == sum(weights.values())
    assert np.array_equal(result.total, sum(weights[v] * comp[v].q.astype(np.uint64) for v in params.nodes))
    # ... and within quantization error of the true weighted mean of the (clipped) sparse updates
    mean = C.dequantize_mean(result.total, weight=result.weight, bits=bits, clip=clip)
    true = sum(weights[v] * np.clip(updates[v][params.support], -clip, clip) for v in params.nodes) / result.weight
    step = clip / (2 ** (bits - 1) - 1)
    assert np.abs(mean - true).max() <= (step if stochastic else step / 2) + 1e-12


@pytest.mark.parametrize("packing", ["word", "bits"])
@pytest.mark.parametrize(("stage", "count"), [("advertise", 3), ("share-keys", 3), ("collect-masked", 3),
                                              ("unmask", 3), ("collect-masked", 1)])
def test_dropouts_up_to_n_minus_t_give_the_survivors_exact_sum(stage, count, packing):
    params = make_params(7, packing=packing)  # complete graph: degree 6, t = 4, so up to 3 may drop
    assert params.threshold == 4 and params.degree == 6
    inputs = random_inputs(params, np.random.default_rng(1))
    gone = set(params.nodes[1:1 + count])
    result, _, _ = run_round(params, inputs, drop={stage: gone})
    # a client that uploaded its masked vector is in the sum even if it misses the unmask stage
    in_sum = set(params.nodes) - (gone if stage != "unmask" else set())
    expected = _sum(inputs, in_sum)
    assert set(result.survivors) == in_sum
    assert np.array_equal(result.total, expected[:-1]) and result.weight == int(expected[-1])
    if stage == "collect-masked":
        assert set(result.dropped) == gone  # their pair masks were removed


def test_dropouts_at_every_stage_in_one_round():
    params = make_params(7)
    inputs = random_inputs(params, np.random.default_rng(2))
    a, b, c = params.nodes[:3]
    result, _, _ = run_round(params, inputs, drop={"advertise": {a}, "collect-masked": {b}, "unmask": {c}})
    assert np.array_equal(result.total, _sum(inputs, set(params.nodes) - {a, b})[:-1])


@pytest.mark.parametrize("stage", ["advertise", "share-keys", "collect-masked", "unmask"])
def test_below_threshold_the_round_is_refused(stage, caplog):
    params = make_params(7)
    inputs = random_inputs(params, np.random.default_rng(3))
    gone = set(params.nodes[:4])  # n - t + 1 = 4
    with caplog.at_level(logging.WARNING), pytest.raises(RoundRefused, match="threshold"):
        run_round(params, inputs, drop={stage: gone})
    assert "refused" in caplog.text


def test_sparse_graph_with_dropouts_gives_the_exact_sum():
    params = make_params(30, degree=8, size=40, density=0.5)
    assert params.degree == 8 and params.threshold == 5
    inputs = random_inputs(params, np.random.default_rng(4))
    gone = {params.nodes[3], params.nodes[17]}
    late = {params.nodes[25]}
    result, _, _ = run_round(params, inputs, drop={"collect-masked": gone, "unmask": late})
    assert np.array_equal(result.total, _sum(inputs, set(params.nodes) - gone)[:-1])
    assert set(result.dropped) == gone


def test_no_single_masked_upload_equals_its_plaintext():
    params = make_params(5, size=400, density=0.5)
    inputs = random_inputs(params, np.random.default_rng(5))
    _, _, uploads = run_round(params, inputs)
    for v, y in uploads.items():
        plain = inputs[v]
        masked = unpack_masked(y, bits=params.field_bits, packing=params.packing, length=params.length)
        assert (masked == plain).mean() < 0.01  # uniform in Z_2^m: equal by chance about 2^-m of the time
    first = unpack_masked(uploads[params.nodes[0]], bits=params.field_bits, packing="word", length=params.length)
    assert first.max() > 2 ** (params.field_bits - 2)  # spread over the field, unlike w * q


def test_a_client_with_other_parameters_makes_the_round_refused_not_wrong():
    params = make_params(5)
    other = dataclasses.replace(params, clip=2.0)  # another context: its pair masks do not cancel
    inputs = random_inputs(params, np.random.default_rng(6))
    # caught at once: the context is bound into the signature of its round keys, so the server rejects it
    # at advertise, and the others' sum stays exact
    srv = ServerSecAgg(params)
    result, _, _ = run_round(params, inputs, client_params={params.nodes[0]: other}, server=srv)
    assert any(f"node {params.nodes[0]}" in r and "not signed" in r for r in srv.rejections)
    assert np.array_equal(result.total, _sum(inputs, params.nodes[1:])[:-1])


def test_a_garbled_masked_vector_inside_the_field_makes_the_round_refused_not_wrong():
    params = make_params(5, size=200)
    inputs = random_inputs(params, np.random.default_rng(12))
    rng = np.random.default_rng(13)

    def tamper(stage, node, rep):
        if stage == "collect-masked" and node == params.nodes[0]:  # e.g. masked with another self seed
            y = rng.integers(0, 2**params.field_bits, params.length).astype(rep.y.dtype)
            return MaskedReply(y=y, undecryptable=rep.undecryptable)
        return rep

    with pytest.raises(RoundRefused, match="masks did not cancel"):
        run_round(params, inputs, tamper=tamper)


@pytest.mark.parametrize(("bad", "reason"), [
    (lambda y: y.astype(np.int64), "dtype"),
    (lambda y: y[:-1], "shape"),
    (lambda y: np.full_like(y, 2**13), "outside the field"),  # m = 13 for 7 clients, weights <= 4, 8 bits
])
def test_bad_masked_vector_is_rejected_and_the_round_goes_on(bad, reason, caplog):
    params = make_params(7)
    assert params.field_bits == 13
    inputs = random_inputs(params, np.random.default_rng(7))
    victim = params.nodes[2]

    def tamper(stage, node, rep):
        if stage == "collect-masked" and node == victim:
            return MaskedReply(y=bad(rep.y), undecryptable=rep.undecryptable)
        return rep

    srv = ServerSecAgg(params)
    with caplog.at_level(logging.WARNING):
        result, _, _ = run_round(params, inputs, tamper=tamper, server=srv)
    assert any(reason in r and f"node {victim}" in r for r in srv.rejections)
    assert np.array_equal(result.total, _sum(inputs, set(params.nodes) - {victim})[:-1])


def test_a_wrong_revealed_share_is_rejected_by_its_commitment():
    params = make_params(7)
    inputs = random_inputs(params, np.random.default_rng(8))
    liar = params.nodes[4]

    def tamper(stage, node, rep):
        if stage == "unmask" and node == liar:
            return UnmaskReply(b_nodes=rep.b_nodes, b_shares=[(5).to_bytes(33, "big")] * len(rep.b_shares),
                               s_nodes=rep.s_nodes, s_shares=rep.s_shares)
        return rep

    srv = ServerSecAgg(params)
    result, _, _ = run_round(params, inputs, tamper=tamper, server=srv)
    assert any("commitment" in r and f"node {liar}" in r for r in srv.rejections)
    assert np.array_equal(result.total, _sum(inputs, params.nodes)[:-1])  # its input still counts


def test_duplicate_public_keys_are_rejected():
    params = make_params(7)
    inputs = random_inputs(params, np.random.default_rng(9))
    copied: dict = {}

    def tamper(stage, node, rep):
        if stage == "advertise":
            copied.setdefault("adv", rep)
            if node == params.nodes[1]:  # node 1 advertises node 0's round keys, signed with its own identity
                sk, pk = new_identity()
                adv = copied["adv"]
                sig = sign(sk, round_keys_statement(context=params.context, node=node, c_pk=adv.c_pk, s_pk=adv.s_pk))
                return dataclasses.replace(adv, id_pk=pk, sig=sig)
        return rep

    srv = ServerSecAgg(params)
    result, _, _ = run_round(params, inputs, tamper=tamper, server=srv)
    assert sum("another node's" in r for r in srv.rejections) == 2
    assert np.array_equal(result.total, _sum(inputs, params.nodes[2:])[:-1])


def test_client_refuses_a_missed_stage_and_unsafe_requests():
    params = make_params(7)  # t = 4, quorum 4
    inputs = random_inputs(params, np.random.default_rng(10))
    node = params.nodes[0]
    client, _ = ClientSecAgg.start(params=params, node=node, x=inputs[node], policy=HONEST_CLIENTS)
    with pytest.raises(MessageError, match="a stage was missed"):
        client.masked_input(MaskRequest(mask_with=[], srcs=[], cts=[]))
    # a real round in which two neighbours drop before masking and this client skips the unmask stage:
    # it is left in the 'signed' state, with the request the server sent it
    others = [v for v in params.nodes if v != node]
    gone = set(others[4:])
    sent: dict = {}

    def keep(stage, v, req):
        if stage == "unmask" and v == node:
            sent["req"] = req
        return req

    _, clients, _ = run_round(params, inputs, drop={"collect-masked": gone, "unmask": {node}}, tamper_request=keep)
    c, req = clients[node], sent["req"]
    nb = [v for v in c.mask_with if v not in gone]
    assert c.stage == "signed" and req.dropped == sorted(gone)
    with pytest.raises(MessageError, match="survivor and dropped"):
        c.unmask(dataclasses.replace(req, dropped=[*req.dropped, nb[0]]))
    with pytest.raises(MessageError, match="fewer than the threshold"):
        c.unmask(dataclasses.replace(req, num_survivors=params.threshold - 1))
    with pytest.raises(MessageError, match="did not mask with"):
        c.unmask(dataclasses.replace(req, survivors=[*req.survivors, 999]))
    reply = c.unmask(req)
    assert reply.b_nodes == sorted([node, *nb]) and reply.s_nodes == sorted(gone)
    assert node not in reply.s_nodes  # never its own mask key


def test_client_refuses_keys_of_non_neighbours():
    params = make_params(30, degree=4, size=20)
    node = params.nodes[0]
    stranger = next(v for v in params.nodes if v not in params.graph[node] and v != node)
    x = fold_weight(np.zeros(params.length - 1, np.uint8), weight=1, max_weight=params.max_weight)
    client, _ = ClientSecAgg.start(params=params, node=node, x=x, policy=HONEST_CLIENTS)
    from guardedtuning.strategies.secagg.wire import KeysRequest
    keys = list(params.graph[node][:3]) + [stranger]
    with pytest.raises(MessageError, match="non-neighbours"):
        client.share_keys(KeysRequest(nodes=keys, c_pks=[b"a" * 32] * 4, s_pks=[b"b" * 32] * 4,
                                      id_pks=[bytes([i]) * 32 for i in range(4)], sigs=[b"s" * 64] * 4))


def test_client_state_round_trips_through_records():
    params = make_params(5)
    inputs = random_inputs(params, np.random.default_rng(11))
    _, clients, _ = run_round(params, inputs, drop={"unmask": {params.nodes[0]}})
    c = clients[params.nodes[0]]
    cfg, arrays = c.to_records()
    back = ClientSecAgg.from_records(cfg, arrays, params=params, identity=c.identity, pins=c.pins)
    assert (back.stage, back.secrets, back.peers, back.held, back.mask_with, back.signed) == \
        (c.stage, c.secrets, c.peers, c.held, c.mask_with, c.signed)
    assert back.stage == "signed" and back.signed == list(params.nodes)


def test_wire_rejects_missing_keys_wrong_stage_and_misaligned_lists():
    req = UnmaskRequest(survivors=[1, 2], dropped=[3], num_survivors=2, signers=[1, 2], signer_pks=[b"k" * 32] * 2,
                        signatures=[b"s" * 64] * 2)
    content = to_content(req, stage="unmask", server_round=4)
    with pytest.raises(MessageError, match="a stage was missed"):
        from_content(content, UnmaskRequest, stage=SHARE_KEYS, server_round=4, source="t")
    with pytest.raises(MessageError, match="round 5"):
        from_content(content, UnmaskRequest, stage="unmask", server_round=5, source="t")
    del content["secagg-stage"]["dropped"]
    with pytest.raises(MessageError, match="lacks 'dropped'"):
        from_content(content, UnmaskRequest, stage="unmask", server_round=4, source="t")
    bad = to_content(UnmaskReply(b_nodes=[1, 2], b_shares=[b"x" * 33], s_nodes=[], s_shares=[]),
                     stage="unmask", server_round=1)
    with pytest.raises(MessageError, match="not aligned"):
        from_content(bad, UnmaskReply, stage="unmask", server_round=1, source="t")
    short = to_content(UnmaskReply(b_nodes=[1], b_shares=[b"x" * 32], s_nodes=[], s_shares=[]),
                       stage="unmask", server_round=1)
    with pytest.raises(MessageError, match="33-byte"):
        from_content(short, UnmaskReply, stage="unmask", server_round=1, source="t")


def test_the_server_never_reconstructs_both_secrets_of_one_client(monkeypatch):
    params = make_params(7)
    inputs = random_inputs(params, np.random.default_rng(14))
    rebuilt: list[tuple[int, str]] = []
    orig = ServerSecAgg._reconstruct

    def spy(self, owner, shares, what):  # type: ignore[no-untyped-def]
        rebuilt.append((owner, what))
        return orig(self, owner, shares, what)

    monkeypatch.setattr(ServerSecAgg, "_reconstruct", spy)
    gone = set(params.nodes[:2])
    result, _, _ = run_round(params, inputs, drop={"collect-masked": gone})
    seeds = {o for o, w in rebuilt if w == "self-mask seed"}
    keys = {o for o, w in rebuilt if w == "mask key"}
    assert seeds == set(result.survivors) and keys == gone and not seeds & keys


@pytest.mark.parametrize("drop", [{}, {"collect-masked": {101}}])
def test_input_given_at_the_masking_stage_gives_the_same_exact_sum(drop):
    """The client mod's order: keys and shares before training, the input only when masking."""
    params = make_params(5, max_weight=4)
    inputs = random_inputs(params, np.random.default_rng(3))
    result, clients, _ = run_round(params, inputs, drop=drop, late_input=True)
    survivors = [v for v in params.nodes if v not in drop.get("collect-masked", set())]
    assert result.survivors == tuple(survivors)
    assert np.array_equal(np.append(result.total, result.weight), _sum(inputs, survivors) % (1 << params.field_bits))
    assert all(c.x is None for c in clients.values())  # the plain input is not kept once masked


def test_an_input_given_twice_or_never_is_refused():
    params = make_params(3)
    x = random_inputs(params, np.random.default_rng(0))[101]
    srv = ServerSecAgg(params)
    starts = {v: ClientSecAgg.start(params=params, node=v, x=x if v == 101 else None, policy=HONEST_CLIENTS)
              for v in params.nodes}
    keys = srv.receive_advertise({v: adv for v, (_, adv) in starts.items()})
    masks = srv.receive_shares({v: starts[v][0].share_keys(keys[v]) for v in params.nodes})
    with pytest.raises(MessageError, match="an input was given twice"):
        starts[101][0].masked_input(masks[101], x=x)
    with pytest.raises(MessageError, match="no input to mask"):
        starts[102][0].masked_input(masks[102])
    with pytest.raises(MessageError, match="expected uint64"):
        starts[103][0].masked_input(masks[103], x=x.astype(np.int64))
