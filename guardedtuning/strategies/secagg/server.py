"""The server side of the protocol: routes keys and shares, sums, unmasks, checks.

:class:`ServerSecAgg` holds no grid: each ``receive_*`` method takes the decoded replies
of one stage (node -> payload; a node that did not answer is simply absent) and returns
the next stage's requests (node -> payload), until :meth:`ServerSecAgg.receive_unmask`
returns the :class:`SecureSum`. A reply that breaks the protocol is rejected with its
reason in :attr:`ServerSecAgg.rejections` (and the log), and its node counts as dropped.

The server checks each client's signature of its round keys (against the identity key
it advertised) and relays the keys with the signatures, so clients can check them too;
after the masked uploads it tells every survivor the one survivor set, collects their
signatures of it and relays them (SecAgg+'s consistency round): a client reveals shares
only after ``quorum`` signatures of the set it signed.

The server reconstructs the self-mask seed of survivors only and the mask key of
dropped clients only, so it never holds what would unmask one client's input. A round
is refused (:class:`RoundRefused`) as soon as fewer than ``threshold`` clients remain
(``quorum`` after the masked uploads),
or a secret to be reconstructed has fewer than ``threshold`` verified shares, before
any share is asked for; and after unmasking when the sum is outside the range honest
inputs can produce (masks that did not cancel), so a wrong aggregate is never returned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from guardedtuning.codecs import max_level
from guardedtuning.errors import GuardedTuningError
from guardedtuning.strategies.secagg.keys import (
    agree,
    commitment,
    new_keypair,
    pair_seeds,
    public_key_of,
    round_keys_statement,
    survivors_statement,
    verify,
)
from guardedtuning.strategies.secagg.masking import pair_sign, reduce, unpack_masked
from guardedtuning.strategies.secagg.params import RoundParams
from guardedtuning.strategies.secagg.prg import expand
from guardedtuning.strategies.secagg.shamir import combine_secret, share_from_bytes
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

log = logging.getLogger(__name__)


class RoundRefused(GuardedTuningError):
    """Too few clients or shares remain to aggregate securely; the round is skipped."""


@dataclass(frozen=True)
class SecureSum:
    """What the server learns: the survivors' sums, and who survived or dropped.

    Attributes
    ----------
    total : numpy.ndarray
        ``sum_i w_i q_i`` over survivors, uint64, shape ``(k,)``.
    weight : int
        ``sum_i w_i`` over survivors.
    survivors : tuple of int
        Clients whose inputs are in the sum.
    dropped : tuple of int
        Clients whose pair masks were removed (they shared keys but their input is not in the sum).
    """

    total: np.ndarray
    weight: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


class ServerSecAgg:
    """Drives one round's stages for :class:`RoundParams` (see the module docstring)."""

    def __init__(self, params: RoundParams) -> None:
        self.params = params
        self.rejections: list[str] = []
        self.keys: dict[int, Advertise] = {}
        self.offered: dict[int, list[int]] = {}        # node -> neighbours whose keys it got
        self.commits: dict[int, dict[int, tuple[bytes, bytes]]] = {}  # owner -> holder -> (b, s)
        self.sealed: dict[int, dict[int, bytes]] = {}  # dst -> src -> ciphertext
        self.mask_with: dict[int, list[int]] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.unmask_requests: dict[int, UnmaskRequest] = {}
        self.survivors: list[int] = []
        self.dropped: list[int] = []
        self.cannot_open: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ helpers

    def reject(self, node: int, stage: str, reason: str) -> None:
        msg = f"round {self.params.server_round}, {stage}: node {node} rejected: {reason}"
        self.rejections.append(msg)
        log.warning("%s", msg)

    def _refuse(self, reason: str) -> RoundRefused:
        msg = f"round {self.params.server_round} refused, the global model is unchanged: {reason}"
        log.warning("%s", msg)
        return RoundRefused(msg)

    def _prune(self, active: set[int], neighbours: Mapping[int, list[int]] | Mapping[int, tuple[int, ...]],
               stage: str) -> set[int]:
        """Drop, repeatedly, nodes with fewer than ``threshold - 1`` active neighbours (they cannot be recovered)."""
        t = self.params.threshold
        changed = True
        while changed:
            changed = False
            for u in sorted(active):
                if len(set(neighbours[u]) & active) + 1 < t:
                    active.discard(u)
                    self.reject(u, stage, f"fewer than {t - 1} neighbours remain to hold its shares")
                    changed = True
        if len(active) < t:
            raise self._refuse(f"{len(active)} clients remain after {stage}, fewer than the threshold {t}")
        return active

    # ------------------------------------------------------------------ stages

    def receive_advertise(self, adverts: Mapping[int, Advertise]) -> dict[int, KeysRequest]:
        """Public keys in; each client's neighbours' keys out."""
        p = self.params
        probe_sk, _ = new_keypair()
        seen: dict[bytes, int] = {}
        clash: set[int] = set()
        ok: dict[int, Advertise] = {}
        for node, adv in sorted(adverts.items()):
            if node not in p.graph:
                self.reject(node, "advertise", "not a participant of this round")
                continue
            if adv.c_pk == adv.s_pk:
                self.reject(node, "advertise", "channel and mask keys are the same key")
                continue
            try:
                for pk in (adv.c_pk, adv.s_pk):
                    agree(private=probe_sk, public=pk, info=b"probe")
            except ValueError:
                self.reject(node, "advertise", "a public key is a low-order X25519 point")
                continue
            if not verify(adv.id_pk, adv.sig, round_keys_statement(context=p.context, node=node, c_pk=adv.c_pk,
                                                                   s_pk=adv.s_pk)):
                self.reject(node, "advertise", "its round keys are not signed by the identity key it sent")
                continue
            for pk in (adv.c_pk, adv.s_pk, adv.id_pk):
                if pk in seen:
                    clash |= {node, seen[pk]}
                seen[pk] = node
            ok[node] = adv
        for node in sorted(clash):
            self.reject(node, "advertise", "its public key is also another node's")
            ok.pop(node, None)
        active = self._prune(set(ok), p.graph, "advertise")
        self.keys = {v: ok[v] for v in active}
        out: dict[int, KeysRequest] = {}
        for u in sorted(active):
            nodes = sorted(set(p.graph[u]) & active)
            self.offered[u] = nodes
            out[u] = KeysRequest(nodes=nodes, c_pks=[self.keys[v].c_pk for v in nodes],
                                 s_pks=[self.keys[v].s_pk for v in nodes], id_pks=[self.keys[v].id_pk for v in nodes],
                                 sigs=[self.keys[v].sig for v in nodes])
        return out

    def receive_shares(self, replies: Mapping[int, SharesReply]) -> dict[int, MaskRequest]:
        """Sealed shares and commitments in; per client, whom to mask with and its sealed shares out."""
        ok: set[int] = set()
        for node, rep in sorted(replies.items()):
            if node not in self.offered:
                self.reject(node, "share-keys", "was not asked for shares")
                continue
            if rep.dsts != self.offered[node] or rep.holders != sorted([*self.offered[node], node]):
                self.reject(node, "share-keys", "shares are not addressed to exactly the neighbours offered")
                continue
            ok.add(node)
            self.commits[node] = {h: (b, s) for h, b, s in zip(rep.holders, rep.commit_b, rep.commit_s, strict=True)}
            for dst, ct in zip(rep.dsts, rep.cts, strict=True):
                self.sealed.setdefault(dst, {})[node] = ct
        active = self._prune(ok, self.offered, "share-keys")
        out: dict[int, MaskRequest] = {}
        for u in sorted(active):
            peers = sorted(set(self.offered[u]) & active)
            self.mask_with[u] = peers
            out[u] = MaskRequest(mask_with=peers, srcs=peers, cts=[self.sealed[u][v] for v in peers])
        return out

    def receive_masked(self, replies: Mapping[int, MaskedReply]) -> dict[int, ConsistencyRequest]:
        """Masked vectors in; the one survivor set out to every survivor, once recovery is sure to be possible."""
        p = self.params
        for node, rep in sorted(replies.items()):
            if node not in self.mask_with:
                self.reject(node, "collect-masked", "was not asked for a masked vector")
                continue
            try:
                self.masked[node] = unpack_masked(rep.y, bits=p.field_bits, packing=p.packing, length=p.length)
            except ValueError as exc:
                self.reject(node, "collect-masked", str(exc))
                continue
            bad = set(rep.undecryptable) & set(self.mask_with[node])
            if bad:
                log.warning("round %d: node %d could not open the shares of %s", p.server_round, node, sorted(bad))
            self.cannot_open[node] = bad
        survivors = set(self.masked)
        t, q = p.threshold, p.quorum
        if len(survivors) < t:
            raise self._refuse(f"{len(survivors)} masked vectors, fewer than the threshold {t}")
        if len(survivors) < q:
            raise self._refuse(f"{len(survivors)} masked vectors, fewer than the quorum {q} that must sign the "
                               "survivor set")
        self.survivors = sorted(survivors)
        self.dropped = sorted(set().union(*(self.mask_with[u] for u in survivors)) - survivors)
        self._check_holders(survivors)
        return {u: ConsistencyRequest(survivors=list(self.survivors)) for u in self.survivors}

    def _check_holders(self, revealers: set[int]) -> None:
        """Refuse the round if some secret to be rebuilt has fewer than ``threshold`` holders among ``revealers``."""
        survivors = set(self.survivors)
        holders: dict[int, set[int]] = {v: ({v} & revealers) for v in survivors | set(self.dropped)}
        for u in revealers:  # who will be able to reveal a share of whose secret
            for v in self.mask_with[u]:
                if v not in self.cannot_open.get(u, set()):
                    holders[v].add(u)
        for v in sorted(holders):
            if len(holders[v]) < self.params.threshold:
                raise self._refuse(f"node {v}'s secret has {len(holders[v])} share holders left, "
                                   f"fewer than {self.params.threshold}")

    def receive_consistency(self, replies: Mapping[int, ConsistencyReply]) -> dict[int, UnmaskRequest]:
        """Survivors' signatures of the survivor set in; the unmask requests, with every valid signature, out."""
        p = self.params
        signed: dict[int, bytes] = {}
        for node, rep in sorted(replies.items()):
            if node not in self.survivors:
                self.reject(node, "consistency", "was not asked to sign the survivor set")
                continue
            if not verify(self.keys[node].id_pk, rep.sig,
                          survivors_statement(context=p.context, node=node, survivors=self.survivors)):
                self.reject(node, "consistency", "its signature of the survivor set does not verify")
                continue
            signed[node] = rep.sig
        if len(signed) < p.quorum:
            raise self._refuse(f"{len(signed)} clients signed the survivor set, fewer than the quorum {p.quorum}")
        self._check_holders(set(signed))
        signers = sorted(signed)
        pks, sigs = [self.keys[v].id_pk for v in signers], [signed[v] for v in signers]
        surv = set(self.survivors)
        for u in signers:
            self.unmask_requests[u] = UnmaskRequest(
                survivors=sorted((set(self.mask_with[u]) & surv) | {u}),
                dropped=sorted(set(self.mask_with[u]) - surv), num_survivors=len(surv),
                signers=signers, signer_pks=pks, signatures=sigs)
        return dict(self.unmask_requests)

    def receive_unmask(self, replies: Mapping[int, UnmaskReply]) -> SecureSum:
        """Revealed shares in; the unmasked, range-checked sum out."""
        p = self.params
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}
        for node, rep in sorted(replies.items()):
            req = self.unmask_requests.get(node)
            if req is None:
                self.reject(node, "unmask", "was not asked for shares")
                continue
            problem = self._check_revealed(node, req, rep)
            if problem:
                self.reject(node, "unmask", problem)
                continue
            for v, sh in zip(rep.b_nodes, rep.b_shares, strict=True):
                b_shares.setdefault(v, {})[p.x_of(node)] = sh
            for v, sh in zip(rep.s_nodes, rep.s_shares, strict=True):
                s_shares.setdefault(v, {})[p.x_of(node)] = sh
        survivors = sorted(self.masked)
        seeds = {v: self._reconstruct(v, b_shares, "self-mask seed") for v in survivors}
        mask_keys = {d: self._reconstruct(d, s_shares, "mask key") for d in self.dropped}
        for d, sk in mask_keys.items():
            if public_key_of(sk) != self.keys[d].s_pk:
                raise self._refuse(f"the reconstructed mask key of node {d} does not match its public key")
        m, n = p.field_bits, p.length
        total = np.zeros(n, dtype=np.uint64)  # uint64 arithmetic wraps mod 2**64, a multiple of 2**m
        for v in survivors:
            total += self.masked[v]
            total -= expand(seeds[v], length=n, bits=m)
        masked_with: dict[int, list[int]] = {d: [] for d in mask_keys}
        for u in survivors:
            for d in self.mask_with[u]:
                if d in masked_with:
                    masked_with[d].append(u)
        for d, sk in mask_keys.items():
            seeds_d = pair_seeds(private=sk, publics={u: self.keys[u].s_pk for u in masked_with[d]},
                                 context=p.context, me=d)
            for u, seed in seeds_d.items():  # u added sign(u, d) * PRG(s_ud); take it away
                mask = expand(seed, length=n, bits=m)
                total = total - mask if pair_sign(u, d) > 0 else total + mask
        total = reduce(total, bits=m)
        weight = int(total[-1])
        if not len(survivors) <= weight <= len(survivors) * p.max_weight or \
                int(total[:-1].max()) > weight * max_level(p.bits):
            raise self._refuse("the unmasked sum is outside what honest inputs can give: masks did not cancel "
                               "(a client used other parameters or sent a wrong vector)")
        return SecureSum(total=total[:-1], weight=weight, survivors=tuple(survivors), dropped=tuple(self.dropped))

    def _check_revealed(self, node: int, req: UnmaskRequest, rep: UnmaskReply) -> str:
        """Why a reveal is unacceptable ('' if it is fine): unasked nodes, bad or uncommitted shares."""
        if not set(rep.b_nodes) <= set(req.survivors) or not set(rep.s_nodes) <= set(req.dropped):
            return "revealed shares that were not asked for"
        ctx = self.params.context
        for kind, nodes, shares, pos in ((b"b", rep.b_nodes, rep.b_shares, 0), (b"s", rep.s_nodes, rep.s_shares, 1)):
            for owner, sh in zip(nodes, shares, strict=True):
                try:
                    share_from_bytes(sh)
                except ValueError as exc:
                    return f"share of node {owner}: {exc}"
                want = self.commits.get(owner, {}).get(node)
                if want is None or commitment(context=ctx, owner=owner, holder=node, kind=kind, share=sh) != want[pos]:
                    return f"its share of node {owner} does not match node {owner}'s commitment"
        return ""

    def _reconstruct(self, owner: int, shares: Mapping[int, Mapping[int, bytes]], what: str) -> bytes:
        got = shares.get(owner, {})
        if len(got) < self.params.threshold:
            raise self._refuse(f"{len(got)} verified shares of node {owner}'s {what}, "
                               f"fewer than the threshold {self.params.threshold}")
        try:
            return combine_secret(got, threshold=self.params.threshold)
        except ValueError as exc:
            raise self._refuse(f"node {owner}'s {what} cannot be reconstructed: {exc}") from exc
