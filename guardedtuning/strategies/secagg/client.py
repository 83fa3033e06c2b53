"""The client side of the protocol: one object per client and round, one method per stage.

:meth:`ClientSecAgg.start` makes the client's keys and self-mask seed; its folded input
(weight times quantized levels, and the weight) comes with it or, when the key stages
run before training (the secure-aggregation mod), with :meth:`ClientSecAgg.masked_input`.
Each stage method takes the server's request and returns the reply. Before answering, every method checks
that it is the expected stage and that the request cannot break the guarantee:

- ``share_keys``: the keys offered are of graph neighbours only;
- ``masked_input``: the client masks with neighbours whose keys it holds, and enough of
  them (``threshold - 1``) hold its shares for it to be recovered;
- ``unmask``: it reveals a neighbour's self-mask share (survivor) *or* its mask-key share
  (dropped), never both, only for nodes it masked with, and only if at least
  ``threshold`` clients survived. It never reveals its own mask-key share.

Its state (keys, seeds, shares, input) is held as bytes, int lists and one uint64 array,
so it fits a Flower ``context.state`` (:meth:`to_records` / :meth:`from_records`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from guardedtuning.errors import MessageError
from guardedtuning.strategies.secagg.keys import channel_key, commitment, new_keypair, open_sealed, pair_seeds, seal
from guardedtuning.strategies.secagg.masking import mask_input, pack_masked
from guardedtuning.strategies.secagg.params import RoundParams
from guardedtuning.strategies.secagg.shamir import SHARE_BYTES, share_from_bytes, split_secret
from guardedtuning.strategies.secagg.wire import (
    Advertise,
    KeysRequest,
    MaskedReply,
    MaskRequest,
    SharesReply,
    UnmaskReply,
    UnmaskRequest,
)

ADVERTISED, SHARED, MASKED, DONE = "advertised", "shared", "masked", "done"
_BYTES = ("c-sk", "c-pk", "s-sk", "s-pk", "b", "own-b", "own-s")


class ClientSecAgg:
    """One client's protocol state for one round (see the module docstring)."""

    def __init__(self, *, params: RoundParams, node: int, stage: str, secrets: dict[str, bytes],
                 x: np.ndarray | None, peers: dict[int, tuple[bytes, bytes]] | None = None,
                 held: dict[int, tuple[bytes, bytes]] | None = None, mask_with: list[int] | None = None) -> None:
        self.params, self.node, self.stage = params, node, stage
        self.secrets = secrets
        self.x = x
        self.peers = peers or {}
        self.held = held or {}
        self.mask_with = mask_with or []

    @property
    def source(self) -> str:
        return f"secure aggregation at node {self.node}, round {self.params.server_round}"

    @classmethod
    def start(cls, *, params: RoundParams, node: int, x: np.ndarray | None = None) -> tuple[ClientSecAgg, Advertise]:
        """New keys and self-mask seed for ``node``; its input ``x`` now or at :meth:`masked_input`.

        ``x``: uint64, ``params.length`` values (weight times levels, then the weight). The
        secure-aggregation mod starts a client before it has trained (the key stages run
        first) and hands the input to :meth:`masked_input`.
        """
        if node not in params.graph:
            raise MessageError(f"node {node} is not a participant of round {params.server_round}")
        if x is not None:
            x = _checked_input(params, node, x)
        c_sk, c_pk = new_keypair()
        s_sk, s_pk = new_keypair()
        secrets = {"c-sk": c_sk, "c-pk": c_pk, "s-sk": s_sk, "s-pk": s_pk, "b": os.urandom(32)}
        return cls(params=params, node=node, stage=ADVERTISED, secrets=secrets, x=x), Advertise(c_pk, s_pk)

    def _expect(self, stage: str, name: str) -> None:
        if self.stage != stage:
            raise MessageError(f"{self.source}: {name} request arrived in state {self.stage!r}; a stage was missed")

    def share_keys(self, req: KeysRequest) -> SharesReply:
        """Shamir-share the self-mask seed and mask key to the neighbours offered, sealed per neighbour."""
        self._expect(ADVERTISED, "share-keys")
        p, me = self.params, self.node
        extra = set(req.nodes) - set(p.graph[me])
        if extra:
            raise MessageError(f"{self.source}: offered keys of non-neighbours {sorted(extra)[:5]}; refused")
        if len(req.nodes) + 1 < p.threshold:
            raise MessageError(f"{self.source}: only {len(req.nodes)} neighbours advertised, "
                               f"{p.threshold - 1} are needed to hold this client's shares")
        holders = sorted([*req.nodes, me])
        xs = [p.x_of(h) for h in holders]
        b_sh = split_secret(self.secrets["b"], xs=xs, threshold=p.threshold)
        s_sh = split_secret(self.secrets["s-sk"], xs=xs, threshold=p.threshold)
        self.peers = {v: (c, s) for v, c, s in zip(req.nodes, req.c_pks, req.s_pks, strict=True)}
        dsts, cts = [], []
        for v in sorted(req.nodes):
            try:
                key = channel_key(private=self.secrets["c-sk"], public=self.peers[v][0], context=p.context,
                                  src=me, dst=v)
            except ValueError as exc:
                raise MessageError(f"{self.source}: node {v}'s channel key is unusable ({exc}); refused") from exc
            x = p.x_of(v)
            cts.append(seal(key=key, plaintext=b_sh[x] + s_sh[x], context=p.context, src=me, dst=v))
            dsts.append(v)
        self.secrets["own-b"], self.secrets["own-s"] = b_sh[p.x_of(me)], s_sh[p.x_of(me)]
        ctx = p.context
        commit_b = [commitment(context=ctx, owner=me, holder=h, kind=b"b", share=b_sh[p.x_of(h)]) for h in holders]
        commit_s = [commitment(context=ctx, owner=me, holder=h, kind=b"s", share=s_sh[p.x_of(h)]) for h in holders]
        self.stage = SHARED
        return SharesReply(dsts=dsts, cts=cts, holders=holders, commit_b=commit_b, commit_s=commit_s)

    def masked_input(self, req: MaskRequest, x: np.ndarray | None = None) -> MaskedReply:
        """Open the shares sent to this client, then upload ``x + self mask + pair masks mod 2**m``.

        ``x``: the input, unless :meth:`start` got it (the same checks apply).
        """
        self._expect(SHARED, "collect-masked")
        p, me = self.params, self.node
        if x is not None:
            if self.x is not None:
                raise MessageError(f"{self.source}: an input was given twice; refused")
            self.x = _checked_input(p, me, x)
        unknown = (set(req.mask_with) | set(req.srcs)) - set(self.peers)
        if unknown:
            raise MessageError(f"{self.source}: asked to mask with or hold shares of {sorted(unknown)[:5]}, "
                               "whose keys it was never offered; refused")
        if len(req.mask_with) + 1 < p.threshold:
            raise MessageError(f"{self.source}: only {len(req.mask_with)} neighbours remain, "
                               f"{p.threshold - 1} are needed to recover this client; refused")
        undecryptable: list[int] = []
        for src, ct in zip(req.srcs, req.cts, strict=True):
            try:
                key = channel_key(private=self.secrets["c-sk"], public=self.peers[src][0], context=p.context,
                                  src=src, dst=me)
                plain = open_sealed(key=key, ciphertext=ct, context=p.context, src=src, dst=me)
                b_share, s_share = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
                share_from_bytes(b_share), share_from_bytes(s_share)
            except ValueError:
                undecryptable.append(src)
                continue
            self.held[src] = (b_share, s_share)
        try:
            seeds = pair_seeds(private=self.secrets["s-sk"], publics={j: self.peers[j][1] for j in req.mask_with},
                               context=p.context, me=me)
        except ValueError as exc:
            raise MessageError(f"{self.source}: a neighbour's mask key is unusable ({exc}); refused") from exc
        if self.x is None:
            raise MessageError(f"{self.source}: no input to mask (none given, or this round's state was lost)")
        y = mask_input(self.x, self_seed=self.secrets["b"], pair_seeds=seeds, me=me, bits=p.field_bits)
        self.x = None  # the plain input is not kept once masked
        self.mask_with = sorted(req.mask_with)
        self.stage = MASKED
        return MaskedReply(y=pack_masked(y, bits=p.field_bits, packing=p.packing), undecryptable=undecryptable)

    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Reveal survivors' self-mask shares and dropped neighbours' mask-key shares."""
        self._expect(MASKED, "unmask")
        p, me = self.params, self.node
        surv, drop = set(req.survivors), set(req.dropped)
        if me not in surv:
            raise MessageError(f"{self.source}: unmask request does not list this client as a survivor; refused")
        if surv & drop:
            raise MessageError(f"{self.source}: nodes {sorted(surv & drop)[:5]} listed as survivor and dropped; "
                               "revealing both shares would unmask them; refused")
        if not (surv | drop) <= set(self.mask_with) | {me}:
            raise MessageError(f"{self.source}: unmask request names nodes this client did not mask with; refused")
        if req.num_survivors < max(p.threshold, len(surv)):
            raise MessageError(f"{self.source}: {req.num_survivors} survivors, fewer than the threshold "
                               f"{p.threshold}; refused")
        b_nodes = sorted(v for v in surv if v == me or v in self.held)
        b_shares = [self.secrets["own-b"] if v == me else self.held[v][0] for v in b_nodes]
        s_nodes = sorted(v for v in drop if v in self.held)
        s_shares = [self.held[v][1] for v in s_nodes]
        self.stage = DONE
        return UnmaskReply(b_nodes=b_nodes, b_shares=b_shares, s_nodes=s_nodes, s_shares=s_shares)

    # ------------------------------------------------------------------ state records

    def to_records(self) -> tuple[ConfigRecord, ArrayRecord]:
        """The state as a ConfigRecord and an ArrayRecord (for ``context.state``)."""
        cfg = ConfigRecord({"node": self.node, "stage": self.stage, "mask-with": list(self.mask_with)})
        for key in _BYTES:
            cfg[key] = self.secrets.get(key, b"")
        peers = sorted(self.peers)
        cfg["peer-nodes"], cfg["peer-c"], cfg["peer-s"] = peers, [self.peers[v][0] for v in peers], \
            [self.peers[v][1] for v in peers]
        held = sorted(self.held)
        cfg["held-nodes"], cfg["held-b"], cfg["held-s"] = held, [self.held[v][0] for v in held], \
            [self.held[v][1] for v in held]
        arrays = ArrayRecord()
        if self.x is not None:
            arrays["x"] = Array(self.x)
        return cfg, arrays

    @classmethod
    def from_records(cls, cfg: ConfigRecord, arrays: ArrayRecord, *, params: RoundParams) -> ClientSecAgg:
        """Inverse of :meth:`to_records`; a :class:`MessageError` if the state is damaged."""
        def get(key: str, typ: type, item: type | None = None) -> Any:
            v: Any = cfg.get(key)
            ok = isinstance(v, typ)
            if ok and item is not None:
                ok = all(isinstance(x, item) for x in v)
            if not ok:
                raise MessageError(f"client state: {key!r} is damaged; the round must start again")
            return v

        secrets = {k: get(k, bytes) for k in _BYTES if get(k, bytes)}
        peers = {v: (c, s) for v, c, s in zip(get("peer-nodes", list, int), get("peer-c", list, bytes),
                                              get("peer-s", list, bytes), strict=True)}
        held = {v: (b, s) for v, b, s in zip(get("held-nodes", list, int), get("held-b", list, bytes),
                                             get("held-s", list, bytes), strict=True)}
        x = arrays["x"].numpy() if "x" in arrays else None
        return cls(params=params, node=get("node", int), stage=get("stage", str), secrets=secrets, x=x,
                   peers=peers, held=held, mask_with=list(get("mask-with", list, int)))


def _checked_input(params: RoundParams, node: int, x: np.ndarray) -> np.ndarray:
    """``x`` as a uint64 copy of ``params.length`` values inside the field, or a MessageError."""
    x = np.asarray(x)
    if x.dtype != np.uint64 or x.shape != (params.length,):
        raise MessageError(f"node {node}: input has dtype {x.dtype} and shape {x.shape}, "
                           f"expected uint64 ({params.length},)")
    if params.field_bits < 64 and x.size and int(x.max()) >= 1 << params.field_bits:
        raise MessageError(f"node {node}: input value {int(x.max())} is outside the field Z_2^{params.field_bits}")
    return x.copy()
