"""The vocabulary's k-NN graph and its n-hop indirect neighbours, built once per model and cached.

PrivTune moves each token's noise mean toward tokens that are *near but not nearest*: the
n-hop indirect neighbours in the k-nearest-neighbour graph of the input embedding matrix
E (V, D). Definitions used here:

- ``knn[v]``: the ``k`` tokens with the smallest Euclidean distance to ``E[v]``, ``v``
  itself excluded (ties broken by index). The graph is directed: ``v -> knn[v]``.
- n-hop indirect neighbours of ``v``: tokens whose shortest path from ``v`` along these
  edges has exactly ``n`` edges (so ``v`` and its 1-hop neighbours are never among them).
- their centroid: the plain mean of their embeddings; a token without any (its
  neighbourhood is closed) falls back to the centroid of its 1-hop neighbours.

Cost for MiniLM (30522 x 384): the k-NN search is a chunked matmul, O(V^2 D), a few
seconds on two CPU cores; the hop expansion is a sparse matrix product (scipy). Results
are cached in the process and on disk under ``<cache_dir>/knn-<digest>-k<k>.pt``, keyed by
a SHA-256 of the embedding matrix, so every client process of a run pays it at most once
per machine.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_MEMORY: dict[tuple[str, ...], torch.Tensor] = {}


def default_cache_dir() -> Path:
    """``$GUARDEDTUNING_CACHE`` or ``~/.cache/guardedtuning``, plus ``privtune``."""
    root = os.environ.get("GUARDEDTUNING_CACHE") or str(Path.home() / ".cache" / "guardedtuning")
    return Path(root) / "privtune"


def embedding_digest(embeddings: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the matrix's float32 bytes and shape."""
    arr = np.ascontiguousarray(embeddings.detach().to("cpu", torch.float32).numpy())
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:16]


def cached(key: tuple[str, ...], cache_dir: Path | None, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()`` once per key: memory first, then ``<cache_dir>/<key joined>.pt``, then compute."""
    if key in _MEMORY:
        return _MEMORY[key]
    path = (cache_dir / ("-".join(key) + ".pt")) if cache_dir is not None else None
    value: torch.Tensor | None = None
    if path is not None and path.is_file():
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):
            value = None  # a torn or foreign file: rebuild it
    if value is None:
        value = build()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(value, tmp)
            os.replace(tmp, path)  # atomic: concurrent clients never read half a file
    _MEMORY[key] = value
    return value


def knn_graph(embeddings: torch.Tensor, *, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices (V, k) of each row's ``k`` nearest other rows by Euclidean distance (int64).

    Row chunks of ``chunk`` x V squared distances (up to a per-row constant) are formed by
    one matmul each, so memory stays at ``4 * chunk * V`` bytes.
    """
    e = embeddings.detach().to("cpu", torch.float32)
    v = e.shape[0]
    if not 1 <= k < v:
        raise ValueError(f"k must be in [1, {v - 1}] for a vocabulary of {v} but is {k}")
    sq = (e * e).sum(1)[None, :]  # (1, V)
    out = torch.empty((v, k), dtype=torch.int64)
    for start in range(0, v, chunk):
        stop = min(start + chunk, v)
        # |b|^2 - 2 a.b ranks like the squared distance (|a|^2 is constant along a row)
        d2 = torch.addmm(sq.expand(stop - start, -1), e[start:stop], e.T, alpha=-2.0)  # (n, V)
        rows = torch.arange(stop - start)
        d2[rows, rows + start] = float("inf")  # never one's own neighbour
        out[start:stop] = d2.topk(k, dim=1, largest=False, sorted=True).indices
    return out


def cached_knn_graph(embeddings: torch.Tensor, *, k: int, cache_dir: Path | None = None,
                     digest: str | None = None) -> torch.Tensor:
    """:func:`knn_graph`, cached per process and on disk (``cache_dir=None``: the default folder)."""
    digest = digest or embedding_digest(embeddings)
    folder = cache_dir if cache_dir is not None else default_cache_dir()
    return cached(("knn", digest, f"k{k}"), folder, lambda: knn_graph(embeddings, k=k))


def exact_hop_neighbours(knn: torch.Tensor, *, hops: int) -> Any:  # scipy.sparse.csr_matrix
    """Binary sparse (V, V) matrix: entry (v, u) = 1 iff u is exactly ``hops`` edges from v."""
    from scipy import sparse

    v, k = knn.shape
    rows = np.repeat(np.arange(v), k)
    adj = sparse.csr_matrix((np.ones(v * k, dtype=np.float32), (rows, knn.numpy().ravel())), shape=(v, v))
    adj.data[:] = 1.0  # duplicate edges cannot occur, but keep it binary regardless
    seen = (sparse.identity(v, dtype=np.float32, format="csr") + adj).tocsr()
    seen.data[:] = 1.0
    frontier = adj
    for _ in range(hops - 1):
        reach = (frontier @ adj).tocsr()
        reach.data[:] = 1.0
        new = (reach - reach.multiply(seen)).tocsr()
        new.eliminate_zeros()
        seen = (seen + new).tocsr()
        seen.data[:] = 1.0
        frontier = new
    return frontier


def hop_centroids(embeddings: torch.Tensor, knn: torch.Tensor, *, hops: int) -> torch.Tensor:
    """Centroid (V, D) of each token's exactly-``hops``-hop neighbours (1-hop centroid if none)."""
    e = embeddings.detach().to("cpu", torch.float32).numpy()
    far = exact_hop_neighbours(knn, hops=hops)
    counts = np.asarray(far.sum(axis=1)).ravel()  # (V,)
    sums = far @ e  # (V, D)
    near = e[knn.numpy()].mean(axis=1)  # (V, D) 1-hop centroid
    has = counts > 0
    out = near.copy()
    out[has] = sums[has] / counts[has, None]
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
