"""The sparse neighbour graph of SecAgg+ and the degree, threshold and quorum it needs.

A random Harary graph (Bell et al., CCS 2020): the round's participants are placed on a
ring in an order drawn from the public *graph seed*, and each is joined to the
``degree / 2`` nearest on each side. Every client has exactly ``degree`` neighbours
(``degree`` is made even; ``degree >= n - 1`` gives the complete graph, i.e. SecAgg).
Clients compute the graph themselves from the participant list and the graph seed,
which they derive from the run id and the round (:func:`graph_seed`), so the server
does not choose it.

How large the degree, threshold and quorum must be follows from a security parameter
``sigma`` (bits) and a collusion fraction ``gamma`` (at most ``C = floor(gamma * n)`` of a
round's ``n`` clients collude with the server):

- threshold ``t > (d + 1) / 2`` (:func:`min_threshold`): the honest share holders of a
  client cannot be split into two groups that each reach ``t`` (one revealing its
  self-mask seed, the other its mask key);
- quorum ``q = max(t, floor((n + C) / 2) + 1)`` (:func:`min_quorum`): a client reveals
  shares only after ``q`` clients signed the same survivor set. Honest clients sign one
  set each, so two different sets cannot both reach ``q`` (``2q > n + C``): every honest
  share holder of a client reveals the same kind of share (Bonawitz et al., CCS 2017, §6);
- degree ``d``: the smallest even ``d`` with ``n * P[H >= t - 1] <= 2**-sigma``, where
  ``H ~ Hypergeometric(n - 1, C, d)`` counts a client's corrupt neighbours on the random
  ring (:func:`leak_probability`, :func:`min_degree`). Then, except with probability
  ``2**-sigma``, no client has ``t - 1`` corrupt neighbours: the colluders cannot rebuild
  a secret alone (``t`` shares) and every partial sum a malicious server can isolate by
  declaring clients dropped still holds at least two honest inputs (its ``t`` share
  holders minus at most ``t - 2`` corrupt). This is the minimum a client accepts
  (:class:`Policy`); when no ``d < n - 1`` meets it, the graph is complete.

The server's automatic degree (:func:`auto_degree`) also keeps every client recoverable
when a third of its share holders drop (``t <= d + 1 - ceil((d + 1) / 3)``): at
``sigma = 40``, ``gamma = 1/3``: 5 clients get the complete graph (``d = 4``, ``t = 3``,
``q = 4``), 10 clients ``d = 8`` (``t = 5``, ``q = 7``), 100 ``d = 52`` (``t = 35``) and 1000
``d = 128`` (``t = 86``; the privacy minimum alone would be ``d = 32`` with ``t = 33``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SECURITY_BITS = 40
"""Default security parameter sigma (bits): the chance the graph lets the colluders unmask a client."""
COLLUSION = 1 / 3
"""Default collusion fraction gamma: the share of a round's clients that may collude with the server."""
DROPOUT = 1 / 3
"""Share of a client's share holders that may drop with its secrets still recoverable (the automatic degree)."""


def corrupt_count(n: int, collusion: float) -> int:
    """``C = floor(collusion * n)``: the most clients of a round of ``n`` that may collude with the server."""
    return math.floor(collusion * n + 1e-9)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def leak_probability(n: int, degree: int, threshold: int, collusion: float) -> float:
    """Union bound over ``n`` clients of ``P[a client has >= threshold - 1 corrupt neighbours]``.

    ``H ~ Hypergeometric(n - 1, C, degree)``: a client's ``degree`` neighbours are a uniform
    subset of the other ``n - 1`` on the randomly ordered ring, ``C`` of which collude.
    """
    corrupt, need = corrupt_count(n, collusion), threshold - 1
    draws = min(degree, n - 1)
    if need <= 0:
        return 1.0
    lo, hi = need, min(corrupt, draws)
    if lo > hi:
        return 0.0
    den = _log_comb(n - 1, draws)
    tail = sum(math.exp(_log_comb(corrupt, x) + _log_comb(n - 1 - corrupt, draws - x) - den) for x in range(lo, hi + 1))
    return min(1.0, n * tail)


def min_threshold(n: int, degree: int, collusion: float) -> int:  # noqa: ARG001 - one signature for the minimums
    """The smallest threshold clients accept on its own: ``> (degree + 1) / 2``, at least 2 (see :meth:`Policy.problem`)."""
    return max(2, (degree + 1) // 2 + 1)


def min_quorum(n: int, threshold: int, collusion: float) -> int:
    """Signatures on one survivor set a client needs before it reveals: ``max(t, floor((n + C) / 2) + 1)``."""
    return max(threshold, (n + corrupt_count(n, collusion)) // 2 + 1)


def _safe_threshold(n: int, degree: int, security_bits: int, collusion: float) -> int:
    """The smallest threshold at or above :func:`min_threshold` that meets the leak bound (may exceed ``degree + 1``)."""
    t = min_threshold(n, degree, collusion)
    while t <= degree + 1 and leak_probability(n, degree, t, collusion) > 2.0 ** -security_bits:
        t += 1
    return t


@lru_cache(maxsize=256)
def min_degree(n: int, security_bits: int = SECURITY_BITS, collusion: float = COLLUSION) -> int:
    """The smallest even degree for which some threshold meets the bound of the module docstring; else ``n - 1``.

    This is what a client accepts (privacy only); :func:`auto_degree` adds dropout slack.
    """
    if n < 2:
        return 0
    for d in range(2, n - 1, 2):
        if _safe_threshold(n, d, security_bits, collusion) <= d + 1:
            return d
    return n - 1


@lru_cache(maxsize=256)
def auto_degree(n: int, security_bits: int = SECURITY_BITS, collusion: float = COLLUSION,
                dropout: float = DROPOUT) -> int:
    """The degree the server picks: :func:`min_degree`'s bound, and a client's secrets stay recoverable when
    ``dropout`` of its ``degree + 1`` share holders drop (``t <= d + 1 - ceil(dropout * (d + 1))``); else ``n - 1``."""
    if n < 2:
        return 0
    for d in range(max(2, min_degree(n, security_bits, collusion)), n - 1, 2):
        if _safe_threshold(n, d, security_bits, collusion) <= d + 1 - math.ceil(dropout * (d + 1) - 1e-9):
            return d
    return n - 1


def effective_degree(n: int, degree: int, *, security_bits: int = SECURITY_BITS, collusion: float = COLLUSION) -> int:
    """``degree`` (0: :func:`auto_degree`) rounded up to even and capped at ``n - 1``."""
    if degree < 0:
        raise ValueError(f"`degree` must be >= 0 (0 picks the minimum for the security parameter) but is {degree}")
    d = auto_degree(n, security_bits, collusion) if degree == 0 else degree + degree % 2
    return min(d, max(n - 1, 0))


def auto_threshold(degree: int) -> int:
    """A strict majority of the ``degree + 1`` share holders (at least 2): :func:`min_threshold` without collusion."""
    return max(2, (degree + 1) // 2 + 1)


@dataclass(frozen=True)
class Policy:
    """What a client accepts: the security parameter and collusion fraction it assumes.

    Attributes
    ----------
    security_bits : int
        ``sigma``: the graph may let the colluders unmask a client with probability at most ``2**-sigma``.
    collusion : float
        ``gamma`` in [0, 1): at most ``floor(gamma * n)`` of a round's ``n`` clients collude with the server.
        0 assumes no colluding client (the server may still be malicious).
    """

    security_bits: int = SECURITY_BITS
    collusion: float = COLLUSION

    def __post_init__(self) -> None:
        if not 1 <= self.security_bits <= 256:
            raise ValueError(f"`security_bits` must be an integer in [1, 256] but is {self.security_bits}")
        if not 0 <= self.collusion < 1:
            raise ValueError(f"`collusion` must be a fraction in [0, 1) but is {self.collusion}")

    def problem(self, *, n: int, degree: int, threshold: int, quorum: int) -> str:
        """Why a round of ``n`` clients with these parameters is unsafe under this policy ('' if it is safe)."""
        why = f"(security {self.security_bits} bits, collusion {self.collusion:.4g} of {n} clients)"
        d_min = min(min_degree(n, self.security_bits, self.collusion), n - 1)
        if degree < d_min:
            return (f"degree {degree} is below the minimum {d_min} {why}; raise aggregation.degree to >= {d_min} "
                    "(0 picks it)")
        t_min = min_threshold(n, degree, self.collusion)
        if threshold < t_min:
            return (f"threshold {threshold} is below the minimum {t_min} for degree {degree} {why}: a server could "
                    f"rebuild a client's secrets from too few shares; raise aggregation.threshold to >= {t_min}")
        leak = leak_probability(n, degree, threshold, self.collusion)
        if leak > 2.0 ** -self.security_bits:
            return (f"degree {degree} with threshold {threshold} lets the colluders hold t - 1 shares of a client "
                    f"with probability {leak:.3g} > 2^-{self.security_bits} {why}; raise aggregation.threshold")
        q_min = min_quorum(n, threshold, self.collusion)
        if quorum < q_min:
            return (f"quorum {quorum} is below the minimum {q_min} {why}: two survivor sets could both be "
                    "signed by a quorum")
        return ""


def graph_seed(run_id: int, server_round: int) -> bytes:
    """The graph's public seed: a hash of the run id and the round, which every client recomputes."""
    return hashlib.sha256(b"gt-secagg/graph-seed/v2/" + run_id.to_bytes(8, "little", signed=False)
                          + server_round.to_bytes(8, "little")).digest()


def neighbour_graph(nodes: Sequence[int], *, degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """node -> its sorted neighbours, for ``degree`` rounded up to even and capped at ``n - 1``."""
    nodes = sorted(nodes)
    n = len(nodes)
    if len(set(nodes)) != n:
        raise ValueError("`nodes` hold duplicates; each participant appears once")
    d = effective_degree(n, degree) if degree == 0 else min(degree + degree % 2, max(n - 1, 0))
    if d >= n - 1:
        return {v: tuple(u for u in nodes if u != v) for v in nodes}
    digest = hashlib.sha256(b"gt-secagg/graph/" + seed).digest()
    order = np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest, "little"))).permutation(n)
    ring = [nodes[i] for i in order]
    out: dict[int, tuple[int, ...]] = {}
    for pos, v in enumerate(ring):
        near = {ring[(pos + s) % n] for s in range(1, d // 2 + 1)} | {ring[(pos - s) % n] for s in range(1, d // 2 + 1)}
        out[v] = tuple(sorted(near))
    return out


def round_shape(n: int, *, degree: int = 0, threshold: int = 0, security_bits: int = SECURITY_BITS,
                collusion: float = COLLUSION) -> tuple[int, int, int]:
    """``(degree, threshold, quorum)`` of a round of ``n`` clients; 0 picks the automatic value.

    The automatic threshold is the smallest at or above :func:`min_threshold` that meets the
    leak bound; the quorum is :func:`min_quorum`. Overrides are returned as given (check
    them with :meth:`Policy.problem`).
    """
    d = effective_degree(n, degree, security_bits=security_bits, collusion=collusion)
    t = threshold or _safe_threshold(n, d, security_bits, collusion)
    return d, t, min_quorum(n, t, collusion)
