"""Helpers for secure-aggregation tests: round parameters and an in-process round driver."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np

from guardedtuning.codecs import rand_k_support
from guardedtuning.strategies.secagg import ClientSecAgg, RoundParams, SecureSum, ServerSecAgg
from guardedtuning.strategies.secagg.graph import auto_threshold, effective_degree
from guardedtuning.strategies.secagg.masking import fold_weight
from guardedtuning.strategies.secagg.wire import (
    COLLECT_MASKED,
    SHARE_KEYS,
    UNMASK,
    Advertise,
    KeysRequest,
    MaskedReply,
    MaskRequest,
    SharesReply,
    UnmaskReply,
    UnmaskRequest,
    from_content,
    to_content,
)


def make_params(n: int = 5, *, degree: int = 0, threshold: int = 0, size: int = 64, density: float = 0.25,
                bits: int = 8, clip: float = 1.0, max_weight: int = 4, packing: str = "word", round_: int = 1,
                first: int = 101, tag: bytes = b"test") -> RoundParams:
    nodes = tuple(range(first, first + n))
    d = effective_degree(n, degree)
    seed = hashlib.sha256(tag + round_.to_bytes(4, "little")).digest()
    return RoundParams(server_round=round_, nodes=nodes, degree=d, threshold=threshold or auto_threshold(d),
                       size=size, density=density, support_mode="rand",
                       support=rand_k_support(size=size, density=density, seed=seed), bits=bits, clip=clip,
                       norm_clip=0.0, max_weight=max_weight, packing=packing, seed=seed)


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
    late_input: bool = False,
) -> tuple[SecureSum, dict[int, ClientSecAgg], dict[int, np.ndarray]]:
    """One round in process. ``drop[stage]``: nodes that do not answer that stage
    (``advertise``, ``share-keys``, ``collect-masked``, ``unmask``). ``tamper(stage, node, reply)``
    may replace a reply. Clients' states go through their records between stages.
    ``late_input``: clients start without their input and get it at the masking stage (the
    order of the client mod: key stages before training)."""
    drop = drop or {}
    srv = server or ServerSecAgg(params)
    r = params.server_round
    clients: dict[int, ClientSecAgg] = {}
    adverts: dict[int, Advertise] = {}
    for v, x in inputs.items():
        if v in drop.get("advertise", set()):
            continue
        clients[v], adv = ClientSecAgg.start(params=(client_params or {}).get(v, params), node=v,
                                             x=None if late_input else x)
        adverts[v] = tamper("advertise", v, adv) if tamper else adv

    def step(stage: str, requests: dict, req_kind: type, rep_kind: type, method: str) -> dict:
        out = {}
        for v, req in requests.items():
            if v in drop.get(stage, set()):
                continue
            cfg, arrays = clients[v].to_records()
            clients[v] = ClientSecAgg.from_records(cfg, arrays, params=clients[v].params)
            extra = {"x": inputs[v]} if late_input and stage == COLLECT_MASKED else {}
            rep = getattr(clients[v], method)(_wire(req, req_kind, stage, r), **extra)
            rep = tamper(stage, v, rep) if tamper else rep
            out[v] = _wire(rep, rep_kind, stage, r)
        return out

    reqs = srv.receive_advertise(adverts)
    reqs = srv.receive_shares(step(SHARE_KEYS, reqs, KeysRequest, SharesReply, "share_keys"))
    masked = step(COLLECT_MASKED, reqs, MaskRequest, MaskedReply, "masked_input")
    reqs = srv.receive_masked(masked)
    result = srv.receive_unmask(step(UNMASK, reqs, UnmaskRequest, UnmaskReply, "unmask"))
    return result, clients, {v: m.y for v, m in masked.items()}
