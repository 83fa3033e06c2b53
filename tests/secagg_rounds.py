"""Helpers for secure-aggregation tests: round parameters and an in-process round driver."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np

from guardedtuning.codecs import rand_k_support
from guardedtuning.strategies.secagg import ClientSecAgg, RoundParams, SecureSum, ServerSecAgg
from guardedtuning.strategies.secagg.graph import Policy, auto_threshold, effective_degree, min_quorum
from guardedtuning.strategies.secagg.masking import fold_weight
from guardedtuning.strategies.secagg.wire import (
    COLLECT_MASKED,
    CONSISTENCY,
    SHARE_KEYS,
    UNMASK,
    Advertise,
    ConsistencyReply,
    ConsistencyRequest,
    KeysRequest,
    MaskedReply,
    MaskRequest,
    SharesReply,
    UnmaskReply,
    UnmaskRequest,
    from_content,
    to_content,
)

HONEST_CLIENTS = Policy(collusion=0.0)
"""The policy of the protocol tests: no client colludes with the server (which may still be malicious).

It keeps a strict-majority threshold and quorum, so the dropout tests tolerate ``n - t`` dropouts;
the collusion-aware minimums are tested on their own (tests/test_secagg_malicious.py)."""


def make_params(n: int = 5, *, degree: int = 0, threshold: int = 0, size: int = 64, density: float = 0.25,
                bits: int = 8, clip: float = 1.0, max_weight: int = 4, packing: str = "word", round_: int = 1,
                first: int = 101, tag: bytes = b"test", run_id: int = 7, quorum: int = 0,
                collusion: float = 0.0) -> RoundParams:
    nodes = tuple(range(first, first + n))
    d = effective_degree(n, degree or n - 1)  # the complete graph unless a degree is asked for
    seed = hashlib.sha256(tag + round_.to_bytes(4, "little")).digest()
    t = threshold or auto_threshold(d)
    return RoundParams(server_round=round_, nodes=nodes, degree=d, threshold=t,
                       size=size, density=density, support_mode="rand",
                       support=rand_k_support(size=size, density=density, seed=seed), bits=bits, clip=clip,
                       norm_clip=0.0, max_weight=max_weight, packing=packing, seed=seed, run_id=run_id,
                       quorum=quorum or min(n, max(t, min_quorum(n, t, collusion))))


def random_inputs(params: RoundParams, rng: np.random.Generator) -> dict[int, np.ndarray]:
    top = 2 ** params.bits - 2
    return {v: fold_weight(rng.integers(0, top + 1, params.length - 1), weight=int(rng.integers(1, params.max_weight + 1)),
                           max_weight=params.max_weight) for v in params.nodes}


def _wire(payload, kind, stage, round_):  # type: ignore[no-untyped-def]
    """Through the records and back, as a message would take it."""
    return from_content(to_content(payload, stage=stage, server_round=round_), kind, stage=stage,
                        server_round=round_, source="test")


def run_round(
    params: RoundParams, inputs: Mapping[int, np.ndarray], *, drop: Mapping[str, set[int]] | None = None,
    client_params: Mapping[int, RoundParams] | None = None,
    tamper: Callable[[str, int, object], object] | None = None, server: ServerSecAgg | None = None,
    late_input: bool = False, policy: Policy = HONEST_CLIENTS, identities: dict[int, bytes] | None = None,
    pins: dict[int, dict[int, bytes]] | None = None,
    tamper_request: Callable[[str, int, object], object] | None = None,
) -> tuple[SecureSum, dict[int, ClientSecAgg], dict[int, np.ndarray]]:
    """One round in process. ``drop[stage]``: nodes that do not answer that stage
    (``advertise``, ``share-keys``, ``collect-masked``, ``consistency``, ``unmask``).
    ``tamper(stage, node, reply)`` may replace a reply, ``tamper_request(stage, node, request)``
    a request (a malicious server). Clients' states go through their records between stages.
    ``late_input``: clients start without their input and get it at the masking stage (the
    order of the client mod: key stages before training). ``identities`` (node -> identity key)
    and ``pins`` (node -> its pins) carry the long-term keys across rounds; fresh when omitted."""
    drop = drop or {}
    srv = server or ServerSecAgg(params)
    r = params.server_round
    clients: dict[int, ClientSecAgg] = {}
    adverts: dict[int, Advertise] = {}
    for v, x in inputs.items():
        if v in drop.get("advertise", set()):
            continue
        clients[v], adv = ClientSecAgg.start(params=(client_params or {}).get(v, params), node=v,
                                             x=None if late_input else x, policy=policy,
                                             identity=(identities or {}).get(v),
                                             pins=None if pins is None else pins.setdefault(v, {}))
        adverts[v] = tamper("advertise", v, adv) if tamper else adv

    def step(stage: str, requests: dict, req_kind: type, rep_kind: type, method: str) -> dict:
        out = {}
        for v, req in requests.items():
            req = tamper_request(stage, v, req) if tamper_request else req
            if v in drop.get(stage, set()):
                continue
            cfg, arrays = clients[v].to_records()
            clients[v] = ClientSecAgg.from_records(cfg, arrays, params=clients[v].params,
                                                   identity=clients[v].identity, pins=clients[v].pins)
            extra = {"x": inputs[v]} if late_input and stage == COLLECT_MASKED else {}
            rep = getattr(clients[v], method)(_wire(req, req_kind, stage, r), **extra)
            rep = tamper(stage, v, rep) if tamper else rep
            out[v] = _wire(rep, rep_kind, stage, r)
        return out

    reqs = srv.receive_advertise(adverts)
    reqs = srv.receive_shares(step(SHARE_KEYS, reqs, KeysRequest, SharesReply, "share_keys"))
    masked = step(COLLECT_MASKED, reqs, MaskRequest, MaskedReply, "masked_input")
    reqs = srv.receive_masked(masked)
    reqs = srv.receive_consistency(step(CONSISTENCY, reqs, ConsistencyRequest, ConsistencyReply, "consistency"))
    result = srv.receive_unmask(step(UNMASK, reqs, UnmaskRequest, UnmaskReply, "unmask"))
    return result, clients, {v: m.y for v, m in masked.items()}
