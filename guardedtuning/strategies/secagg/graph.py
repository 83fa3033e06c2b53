"""The sparse neighbour graph of SecAgg+: who masks with whom and who holds whose shares.

A random Harary graph (Bell et al., CCS 2020): the round's participants are placed on a
ring in an order drawn from the public round seed, and each is joined to the
``degree / 2`` nearest on each side. Every client has exactly ``degree`` neighbours
(``degree`` is made even; ``degree >= n - 1`` gives the complete graph, i.e. SecAgg).
Clients compute the graph themselves from the participant list and the seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np


def auto_degree(n: int) -> int:
    """Default degree: ``2 * ceil(1.5 * log2 n)``, capped at ``n - 1`` (10 -> 9, 100 -> 20, 1000 -> 30)."""
    if n < 2:
        return 0
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def effective_degree(n: int, degree: int) -> int:
    """``degree`` (0: :func:`auto_degree`) rounded up to even and capped at ``n - 1``."""
    if degree < 0:
        raise ValueError(f"`degree` must be >= 0 (0 picks O(log n)) but is {degree}")
    d = auto_degree(n) if degree == 0 else degree + degree % 2
    return min(d, max(n - 1, 0))


def auto_threshold(degree: int) -> int:
    """Default threshold: a strict majority of the ``degree + 1`` share holders (at least 2)."""
    return max(2, (degree + 1) // 2 + 1)


def neighbour_graph(nodes: Sequence[int], *, degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """node -> its sorted neighbours, for the effective ``degree`` (see :func:`effective_degree`)."""
    nodes = sorted(nodes)
    n = len(nodes)
    if len(set(nodes)) != n:
        raise ValueError("`nodes` hold duplicates; each participant appears once")
    d = effective_degree(n, degree)
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
