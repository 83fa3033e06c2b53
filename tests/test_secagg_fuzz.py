"""Fuzzing the malicious-server checks: >= 1,000 malformed consistency and unmask requests per type.

Each request is a genuine one, through its records, with one to three random mutations (a key
dropped, a value of the wrong type or length, ids duplicated, huge or negative, another round or
stage). A client must answer each with a MessageError or a reply that reveals nothing beyond
the survivor set it signed; never another exception, and never with its state advanced (it still
answers the genuine request afterwards). The server's side of the consistency round gets 1,000
replies with bad signatures: each is rejected by name and the round goes on.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from guardedtuning.errors import MessageError
from guardedtuning.strategies.secagg import ClientSecAgg
from guardedtuning.strategies.secagg.wire import (
    CONSISTENCY,
    STAGE_KEY,
    UNMASK,
    ConsistencyReply,
    ConsistencyRequest,
    UnmaskRequest,
    from_content,
    to_content,
)
from tests.test_secagg_malicious import DEPLOYED, honest_until_masked, make_params, random_inputs

CASES = 1000


def _junk(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """A random record value: ints (huge, negative), floats (nan, inf), strings, bytes, lists of either."""
    kind = rng.integers(9)
    if kind == 0:
        return int(rng.choice([0, -1, 2**62, -(2**62), 101, 7]))
    if kind == 1:
        return float(rng.choice([np.nan, np.inf, -np.inf, 0.5]))
    if kind == 2:
        return "x" * int(rng.integers(0, 5))
    if kind == 3:
        return bytes(rng.integers(0, 256, int(rng.choice([0, 1, 31, 32, 33, 63, 64, 65]))).astype(np.uint8))
    if kind == 4:
        return [int(v) for v in rng.choice([101, 102, 103, 104, 105, 999, -5, 2**62], int(rng.integers(0, 8)))]
    if kind == 5:
        return [bytes(rng.integers(0, 256, int(rng.choice([32, 64, 5]))).astype(np.uint8))
                for _ in range(int(rng.integers(0, 6)))]
    if kind == 6:
        return bool(rng.integers(2))
    if kind == 7:
        return []
    return [0.5, 1.5]


def mutate(content: RecordDict, rng: np.random.Generator) -> RecordDict:
    out = copy.deepcopy(content)
    cfg: ConfigRecord = out[STAGE_KEY]
    for _ in range(int(rng.integers(1, 4))):
        key = str(rng.choice(sorted(cfg.keys())))
        op = rng.integers(4)
        try:
            if op == 0:
                del cfg[key]
            elif op == 1 and isinstance(cfg[key], list) and cfg[key]:
                cfg[key] = [*cfg[key], cfg[key][0]]  # a duplicate (or a misaligned list)
            elif op == 2 and isinstance(cfg[key], list) and cfg[key]:
                cfg[key] = list(reversed(cfg[key]))[: int(rng.integers(0, len(cfg[key]) + 1))]
            else:
                cfg[key] = _junk(rng)
        except (TypeError, ValueError, KeyError):
            continue  # a value a ConfigRecord cannot hold cannot be sent either
    return out


def _signed_client():  # type: ignore[no-untyped-def]
    params = make_params(5, collusion=1 / 3)
    inputs = random_inputs(params, np.random.default_rng(31))
    srv, clients, _, masked = honest_until_masked(params, inputs, policy=DEPLOYED)
    consistency = srv.receive_masked(masked)
    return params, srv, clients, consistency


def _fresh(client: ClientSecAgg) -> ClientSecAgg:
    cfg, arrays = client.to_records()
    return ClientSecAgg.from_records(cfg, arrays, params=client.params, identity=client.identity,
                                     pins=dict(client.pins))


@pytest.mark.parametrize("stage", [CONSISTENCY, UNMASK])
def test_malformed_requests_are_refused_or_reveal_only_the_signed_set(stage):
    params, srv, clients, consistency = _signed_client()
    node = params.nodes[1]
    if stage == UNMASK:
        reqs = srv.receive_consistency({v: clients[v].consistency(r) for v, r in consistency.items()})
        genuine, kind = reqs[node], UnmaskRequest
    else:
        genuine, kind = consistency[node], ConsistencyRequest
    base = clients[node]
    content = to_content(genuine, stage=stage, server_round=params.server_round)
    rng = np.random.default_rng(32)
    refused = answered = 0
    for _ in range(CASES):
        client = _fresh(base)
        bad = mutate(content, rng)
        try:
            req = from_content(bad, kind, stage=stage, server_round=params.server_round, source="fuzz")
            reply = client.consistency(req) if stage == CONSISTENCY else client.unmask(req)
        except MessageError:
            refused += 1
            assert client.stage == base.stage  # nothing advanced
            continue
        answered += 1
        if stage == UNMASK:  # whatever passed reveals only shares the signed set allows
            signed = set(base.signed)
            assert set(reply.b_nodes) <= signed and not set(reply.s_nodes) & signed
            assert set(reply.s_nodes) <= set(base.mask_with) - signed
        else:
            assert node in req.survivors and len(set(req.survivors)) >= params.quorum
    assert refused >= CASES * 0.9  # nearly every mutation breaks a check
    final = _fresh(base)
    assert (final.consistency(genuine) if stage == CONSISTENCY else final.unmask(genuine)) is not None


def test_the_server_rejects_bad_survivor_set_signatures_by_name():
    params, srv, clients, consistency = _signed_client()
    good = {v: clients[v].consistency(r) for v, r in consistency.items()}
    rng = np.random.default_rng(33)
    for i in range(CASES):
        liar = params.nodes[i % len(params.nodes)]
        replies = dict(good)
        sig = bytearray(good[liar].sig)
        sig[int(rng.integers(64))] ^= 1 << int(rng.integers(8))  # one flipped bit
        replies[liar] = ConsistencyReply(sig=bytes(sig))
        before = len(srv.rejections)
        srv.unmask_requests.clear()
        reqs = srv.receive_consistency(replies)
        assert liar not in reqs and len(reqs) == len(params.nodes) - 1  # 4 >= quorum 4: the round goes on
        assert len(srv.rejections) == before + 1
        assert f"node {liar} rejected" in srv.rejections[-1] and "does not verify" in srv.rejections[-1]
