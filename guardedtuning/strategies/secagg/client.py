"""The client side of the protocol: one object per client and round, one method per stage.

:meth:`ClientSecAgg.start` makes the client's keys and self-mask seed; its folded input
(weight times quantized levels, and the weight) comes with it or, when the key stages
run before training (the secure-aggregation mod), with :meth:`ClientSecAgg.masked_input`.
Each stage method takes the server's request and returns the reply. Before answering, every method checks
that it is the expected stage and that the request cannot break the guarantee:

- ``start``: the round's degree, threshold and quorum are at least what the client's
  :class:`~.graph.Policy` (security parameter, collusion fraction) requires;
- ``share_keys``: the keys offered are of graph neighbours only, each signed by the
  neighbour's identity key, and that identity key is the one pinned for the neighbour
  when this client first saw it (trust on first use);
- ``masked_input``: the client masks with neighbours whose keys it holds, and enough of
  them (``threshold - 1``) hold its shares for it to be recovered;
- ``consistency``: it signs the survivor set it is told (it must be among them, and
  there must be at least ``quorum``);
- ``unmask``: it reveals only after seeing ``quorum`` valid signatures (by pinned
  identity keys) of the very set it signed, and only for that set: a neighbour's
  self-mask share (survivor) *or* its mask-key share (dropped), never both, only for
  nodes it masked with. It never reveals its own mask-key share.

Its round state (keys, seeds, shares, input) is held as bytes, int lists and one uint64
array, so it fits a Flower ``context.state`` (:meth:`to_records` / :meth:`from_records`);
the identity key and the pins outlive the round and are kept by the caller (the mod).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from guardedtuning.errors import MessageError
from guardedtuning.strategies.secagg.graph import Policy
from guardedtuning.strategies.secagg.keys import (
    channel_key,
    commitment,
    identity_public,
    new_identity,
    new_keypair,
    open_sealed,
    pair_seeds,
    round_keys_statement,
    seal,
    sign,
    survivors_statement,
    verify,
)
from guardedtuning.strategies.secagg.masking import mask_input, pack_masked
from guardedtuning.strategies.secagg.params import RoundParams
from guardedtuning.strategies.secagg.shamir import SHARE_BYTES, share_from_bytes, split_secret
from guardedtuning.strategies.secagg.wire import (
    Advertise,
    ConsistencyReply,
    ConsistencyRequest,
    KeysRequest,
    MaskedReply,
    MaskRequest,
    SharesReply,
    UnmaskReply,
    UnmaskRequest,
)

ADVERTISED, SHARED, MASKED, SIGNED, DONE = "advertised", "shared", "masked", "signed", "done"
_BYTES = ("c-sk", "c-pk", "s-sk", "s-pk", "b", "own-b", "own-s")


class ClientSecAgg:
    """One client's protocol state for one round (see the module docstring)."""

    def __init__(self, *, params: RoundParams, node: int, stage: str, secrets: dict[str, bytes],
                 x: np.ndarray | None, peers: dict[int, tuple[bytes, bytes]] | None = None,
                 held: dict[int, tuple[bytes, bytes]] | None = None, mask_with: list[int] | None = None,
                 identity: bytes | None = None, pins: dict[int, bytes] | None = None,
                 signed: list[int] | None = None) -> None:
        self.params, self.node, self.stage = params, node, stage
        self.secrets = secrets
        self.x = x
        self.peers = peers or {}
        self.held = held or {}
        self.mask_with = mask_with or []
        self.identity = identity if identity is not None else new_identity()[0]
        self.pins = pins if pins is not None else {}  # node -> identity public key, pinned at first sight
        self.signed = signed or []  # the survivor set this client signed

    @property
    def source(self) -> str:
        return f"secure aggregation at node {self.node}, round {self.params.server_round}"

    @classmethod
    def start(cls, *, params: RoundParams, node: int, x: np.ndarray | None = None, identity: bytes | None = None,
              pins: dict[int, bytes] | None = None, policy: Policy | None = None) -> tuple[ClientSecAgg, Advertise]:
        """New keys and self-mask seed for ``node``; its input ``x`` now or at :meth:`masked_input`.

        Parameters
        ----------
        params : RoundParams
            The round's public parameters; refused (:class:`MessageError`) if ``policy`` finds them unsafe.
        node : int
            This client's node id.
        x : numpy.ndarray, optional
            uint64, ``params.length`` values (weight times levels, then the weight). The
            secure-aggregation mod starts a client before it has trained (the key stages run
            first) and hands the input to :meth:`masked_input`.
        identity : bytes, optional
            This client's long-term Ed25519 private key (a fresh one when omitted).
        pins : dict of int to bytes, optional
            node -> identity public key pinned at first sight; updated in place as new nodes are seen.
        policy : Policy, optional
            The security parameter and collusion fraction this client assumes (default :class:`Policy`).
        """
        if node not in params.graph:
            raise MessageError(f"node {node} is not a participant of round {params.server_round}")
        problem = (policy or Policy()).problem(n=len(params.nodes), degree=params.degree,
                                               threshold=params.threshold, quorum=params.quorum)
        if problem:
            raise MessageError(f"secure aggregation at node {node}, round {params.server_round} refused: {problem}")
        if x is not None:
            x = _checked_input(params, node, x)
        c_sk, c_pk = new_keypair()
        s_sk, s_pk = new_keypair()
        secrets = {"c-sk": c_sk, "c-pk": c_pk, "s-sk": s_sk, "s-pk": s_pk, "b": os.urandom(32)}
        client = cls(params=params, node=node, stage=ADVERTISED, secrets=secrets, x=x, identity=identity, pins=pins)
        id_pk = identity_public(client.identity)
        client._pin(node, id_pk, "its own identity key")
        sig = sign(client.identity, round_keys_statement(context=params.context, node=node, c_pk=c_pk, s_pk=s_pk))
        return client, Advertise(c_pk=c_pk, s_pk=s_pk, id_pk=id_pk, sig=sig)

    def _pin(self, node: int, id_pk: bytes, what: str) -> None:
        """Pin ``node``'s identity key at first sight; refuse one that differs from the pinned key."""
        pinned = self.pins.setdefault(node, id_pk)
        if pinned != id_pk:
            raise MessageError(f"{self.source}: {what} (node {node}) is not the identity key pinned for node {node} "
                               "when this client first saw it; the server may be substituting keys; refused")

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
        if len(set(req.id_pks)) != len(req.id_pks) or identity_public(self.identity) in req.id_pks:
            raise MessageError(f"{self.source}: two neighbours offered with one identity key; refused")
        for v, c_pk, s_pk, id_pk, sig in zip(req.nodes, req.c_pks, req.s_pks, req.id_pks, req.sigs, strict=True):
            self._pin(v, id_pk, "the identity key relayed for a neighbour")
            if not verify(id_pk, sig, round_keys_statement(context=p.context, node=v, c_pk=c_pk, s_pk=s_pk)):
                raise MessageError(f"{self.source}: node {v}'s round keys are not signed by its identity key (a "
                                   "substituted or altered key); refused")
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

    def consistency(self, req: ConsistencyRequest) -> ConsistencyReply:
        """Sign the survivor set the server tells this client (SecAgg+'s consistency check)."""
        self._expect(MASKED, "consistency")
        p, me = self.params, self.node
        surv = set(req.survivors)
        if me not in surv:
            raise MessageError(f"{self.source}: the survivor set does not list this client; refused")
        if not surv <= set(p.nodes):
            raise MessageError(f"{self.source}: the survivor set names non-participants {sorted(surv - set(p.nodes))[:5]}"
                               "; refused")
        if len(surv) < p.quorum:
            raise MessageError(f"{self.source}: {len(surv)} survivors, fewer than the quorum {p.quorum}; refused")
        self.signed = sorted(surv)
        self.stage = SIGNED
        return ConsistencyReply(sig=sign(self.identity, survivors_statement(context=p.context, node=me,
                                                                           survivors=self.signed)))

    def _check_signatures(self, req: UnmaskRequest) -> None:
        """At least ``quorum`` valid signatures, by pinned identity keys, of the set this client signed."""
        p, me, signed = self.params, self.node, self.signed
        if sorted(req.survivors) != sorted((set(self.mask_with) & set(signed)) | {me}) or \
                sorted(req.dropped) != sorted(set(self.mask_with) - set(signed)) or req.num_survivors != len(signed):
            raise MessageError(f"{self.source}: the unmask request's survivors / dropped differ from the survivor set "
                               "this client signed; refused")
        if not set(req.signers) <= set(signed):
            raise MessageError(f"{self.source}: signatures from nodes outside the signed survivor set; refused")
        if len(set(req.signer_pks)) != len(req.signer_pks):
            raise MessageError(f"{self.source}: two signers with one identity key; refused")
        statement = {v: survivors_statement(context=p.context, node=v, survivors=signed) for v in req.signers}
        for v, pk, sig in zip(req.signers, req.signer_pks, req.signatures, strict=True):
            self._pin(v, pk, "the identity key relayed for a signer")
            if not verify(pk, sig, statement[v]):
                raise MessageError(f"{self.source}: node {v}'s signature is not of the survivor set this client "
                                   "signed (the server told clients different sets, or altered one); refused")
        if len(req.signers) < p.quorum:
            raise MessageError(f"{self.source}: {len(req.signers)} signatures of the survivor set, fewer than the "
                               f"quorum {p.quorum}; refused")

    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Reveal survivors' self-mask shares and dropped neighbours' mask-key shares, once the set is agreed."""
        self._expect(SIGNED, "unmask")
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
        self._check_signatures(req)
        b_nodes = sorted(v for v in surv if v == me or v in self.held)
        b_shares = [self.secrets["own-b"] if v == me else self.held[v][0] for v in b_nodes]
        s_nodes = sorted(v for v in drop if v in self.held)
        s_shares = [self.held[v][1] for v in s_nodes]
        self.stage = DONE
        return UnmaskReply(b_nodes=b_nodes, b_shares=b_shares, s_nodes=s_nodes, s_shares=s_shares)

    # ------------------------------------------------------------------ state records

    def to_records(self) -> tuple[ConfigRecord, ArrayRecord]:
        """The state as a ConfigRecord and an ArrayRecord (for ``context.state``)."""
        cfg = ConfigRecord({"node": self.node, "stage": self.stage, "mask-with": list(self.mask_with),
                            "signed": list(self.signed)})
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
    def from_records(cls, cfg: ConfigRecord, arrays: ArrayRecord, *, params: RoundParams,
                     identity: bytes | None = None, pins: dict[int, bytes] | None = None) -> ClientSecAgg:
        """Inverse of :meth:`to_records` (with the long-term ``identity`` and ``pins``); a :class:`MessageError`
        if the state is damaged."""
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
                   peers=peers, held=held, mask_with=list(get("mask-with", list, int)), identity=identity, pins=pins,
                   signed=list(get("signed", list, int)))


def _checked_input(params: RoundParams, node: int, x: np.ndarray) -> np.ndarray:
    """``x`` as a uint64 copy of ``params.length`` values inside the field, or a MessageError."""
    x = np.asarray(x)
    if x.dtype != np.uint64 or x.shape != (params.length,):
        raise MessageError(f"node {node}: input has dtype {x.dtype} and shape {x.shape}, "
                           f"expected uint64 ({params.length},)")
    if params.field_bits < 64 and x.size and int(x.max()) >= 1 << params.field_bits:
        raise MessageError(f"node {node}: input value {int(x.max())} is outside the field Z_2^{params.field_bits}")
    return x.copy()
