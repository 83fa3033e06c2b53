"""Compression codecs shared by clients and the secure strategy: plain numpy, no Flower.

An adapter update goes up in four steps, each a function here:

1. **support**: the coordinates sent this round. It is public and data-independent, so
   that every client sends the *same* coordinates (a value only one client touched would
   otherwise be revealed by the sum): :func:`rand_k_support` draws ``k`` coordinates from
   the round seed the server broadcasts; :func:`top_k_support` takes the largest
   coordinates of a public score (the accumulated public aggregates), mixed with
   ``explore`` random ones so that the support can move.
2. **error feedback** and **clipping** (:func:`compress_update`): the client adds the
   residual it kept from earlier rounds, optionally clips the L2 norm of what it sends
   (it bounds a client's contribution; no central DP noise is added), quantizes, and keeps
   everything it did not send as the new residual:
   ``sent + residual == update + old residual``.
3. **quantization** (:func:`quantize`) to ``bits`` bits on the symmetric grid
   ``{-h, ..., h} * clip / h`` with ``h = 2**(bits-1) - 1`` (zero is exact), stored as the
   unsigned level ``q = level + h`` in ``[0, 2h]``; rounding is stochastic (unbiased when
   ``|x| <= clip``, seeded by the caller's generator) or to the nearest level.
4. **packing** (:func:`pack_words`, :func:`pack_bits`): integers that fit in ``m`` bits
   go as the smallest numpy word that holds them (uint8/16/32/64), or bit-packed.

The downlink (the global adapters) can be sent quantized too
(:func:`encode_downlink` / :func:`decode_downlink`): per-tensor symmetric scale,
deterministic rounding, zero exact.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

WORDS = (np.uint8, np.uint16, np.uint32, np.uint64)


# ---------------------------------------------------------------------------- support

def support_size(*, size: int, density: float) -> int:
    """Coordinates kept at ``density`` of ``size``: ``ceil(density * size)``, at least 1."""
    if size < 1:
        raise ValueError(f"`size` must be a positive integer but is {size}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1] but is {density}; e.g. 0.05 sends 5 % of the coordinates")
    return min(size, max(1, math.ceil(density * size)))


def _generator(seed: bytes, label: bytes) -> np.random.Generator:
    digest = hashlib.sha256(b"gt-codecs/" + label + b"/" + seed).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest, "little")))


def rand_k_support(*, size: int, density: float, seed: bytes) -> np.ndarray:
    """``k`` distinct coordinates drawn from ``seed`` alone: identical on every client.

    Parameters
    ----------
    size : int
        Length of the flattened adapter.
    density : float
        Fraction of coordinates kept, in (0, 1].
    seed : bytes
        The round's public seed (the server broadcasts it).

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices, shape ``(k,)``.
    """
    k = support_size(size=size, density=density)
    idx = _generator(seed, b"rand-k").choice(size, size=k, replace=False)
    return np.sort(idx).astype(np.int64)


def top_k_support(*, score: np.ndarray, density: float, explore: float, seed: bytes,
                  candidates: np.ndarray | None = None, always: np.ndarray | None = None) -> np.ndarray:
    """The largest ``|score|`` coordinates, plus ``explore * k`` random others.

    ``score`` must be public (e.g. the sum of past public aggregates), never a client's own
    update. Ties (all of round 1, where the score is zero) are broken by a permutation drawn
    from ``seed``, so the result is the same wherever it is computed. Without exploration
    the support would freeze: the aggregate is non-zero only on the support it was sent on.

    Parameters
    ----------
    score : numpy.ndarray
        Public score, shape ``(size,)``.
    density : float
        Fraction of the ``size`` coordinates kept, in (0, 1].
    explore : float
        Fraction of the ``k`` coordinates drawn at random among the rest, in [0, 1].
    seed : bytes
        The round's public seed.
    candidates : numpy.ndarray, optional
        The coordinates the support may use (:func:`eligible_coordinates`); all when omitted.
        ``k`` is ``support_size(size, density)``, at most the number of candidates.
    always : numpy.ndarray, optional
        Candidates on the support every round (:func:`dense_coordinates`); the top-k and the
        random ones fill the other ``k - len(always)``. More than ``k`` of them: ``ValueError``.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices, shape ``(k,)``.
    """
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"`explore` must be in [0, 1] but is {explore}")
    score = np.asarray(score, dtype=np.float64).ravel()
    if not np.isfinite(score).all():
        raise ValueError("`score` holds NaN or inf; pass the accumulated public aggregate")
    size = score.size
    k = support_size(size=size, density=density)
    if candidates is None:
        cand = np.arange(size)
    else:
        cand = np.asarray(candidates, dtype=np.int64)
        if cand.ndim != 1 or not cand.size or (np.diff(cand) <= 0).any() or cand[0] < 0 or cand[-1] >= size:
            raise ValueError(f"`candidates` must be sorted distinct indices in [0, {size}), at least one")
        k = min(k, cand.size)
    fixed = np.empty(0, np.int64)
    if always is not None and np.size(always):
        fixed = np.asarray(always, dtype=np.int64)
        if fixed.size > k:
            raise ValueError(f"{fixed.size} coordinates must always be sent but the support holds {k}; raise "
                             f"`density` to at least {fixed.size / size:.4f}")
        if not np.isin(fixed, cand).all():
            raise ValueError("`always` holds coordinates that are not among the `candidates`")
        k = k - fixed.size
        cand = np.setdiff1d(cand, fixed, assume_unique=True)
        if not k or not cand.size:
            return np.sort(fixed)
        k = min(k, cand.size)
    gen = _generator(seed, b"top-k")
    tiebreak = gen.permutation(cand.size)
    order = np.lexsort((tiebreak, -np.abs(score[cand])))  # largest |score| first, ties by permutation
    k_top = k - round(explore * k)
    top = order[:k_top]
    rest = np.setdiff1d(np.arange(cand.size), top, assume_unique=True)
    extra = gen.choice(rest, size=k - k_top, replace=False) if k > k_top else np.empty(0, np.int64)
    return np.sort(np.concatenate([fixed, cand[np.concatenate([top, extra]).astype(np.int64)]])).astype(np.int64)


SCOPES = ("all", "lora-b")
"""What a support may use: every coordinate, or all but LoRA's A matrices (``lora-b``)."""


def eligible_coordinates(shapes: Mapping[str, tuple[int, ...]], *, scope: str) -> np.ndarray:
    """The flat indices (sorted-name order, as :func:`flatten`) a support of ``scope`` may use.

    ``lora-b`` leaves out every tensor whose name holds ``.lora_A.`` (peft's naming): the
    update of LoRA's A is never sent, so the global A stays at its initial value, which
    every party draws from the run's seed (A is frozen across rounds; B starts at zero, so
    the product ``B A`` still starts at zero and learns through B). LoRA's B, heads,
    projections and any other tensor stay eligible.

    Parameters
    ----------
    shapes : mapping of str to tuple of int
        Tensor name -> shape of the adapter.
    scope : str
        ``"all"`` or ``"lora-b"``.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices.
    """
    if scope not in SCOPES:
        raise ValueError(f"`scope` is {scope!r}; expected `all` or `lora-b`")
    out, start = [], 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name], dtype=np.int64))
        if scope == "all" or ".lora_A." not in f".{name}.":
            out.append(np.arange(start, start + n, dtype=np.int64))
        start += n
    if not out or not sum(a.size for a in out):
        raise ValueError(f"`scope` {scope!r} leaves no coordinate of the adapter ({sorted(shapes)[:3]}...); "
                         "use aggregation.scope=all")
    return np.concatenate(out)


def dense_coordinates(shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """The flat indices (sorted-name order) of every tensor that is not LoRA's (no ``lora_`` in its name).

    With ``aggregation.dense-rest`` they are on every round's support: in ``guarded`` the
    release projection (1,540 of the bottom's 50,692 coordinates), in ``fedlora`` the head;
    the top-k then picks among LoRA's (B under ``lora-b``).
    """
    out, start = [], 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name], dtype=np.int64))
        if "lora_" not in name:
            out.append(np.arange(start, start + n, dtype=np.int64))
        start += n
    return np.concatenate(out) if out else np.empty(0, np.int64)


def support_digest(support: np.ndarray) -> bytes:
    """SHA-256 of the support (as little-endian uint64), bound into the round context."""
    return hashlib.sha256(np.asarray(support, dtype="<u8").tobytes()).digest()


# ---------------------------------------------------------------------------- flatten

def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Named arrays -> one float64 vector, in sorted name order (the order clients share)."""
    if not arrays:
        raise ValueError("`arrays` is empty; pass the adapter tensors by name")
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)])


def unflatten(vector: np.ndarray, *, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` for the given name -> shape map (sorted name order)."""
    out: dict[str, np.ndarray] = {}
    start = 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name], dtype=np.int64))
        out[name] = np.asarray(vector[start:start + n]).reshape(shapes[name])
        start += n
    if start != len(vector):
        raise ValueError(f"`vector` has {len(vector)} values but the shapes hold {start}")
    return out


def scatter(values: np.ndarray, *, support: np.ndarray, size: int) -> np.ndarray:
    """Dense float64 vector of ``size`` with ``values`` on ``support``, zeros elsewhere."""
    out = np.zeros(size, dtype=np.float64)
    out[support] = values
    return out


# ---------------------------------------------------------------------------- quantization

def _half_levels(bits: int) -> int:
    if not 2 <= bits <= 32:
        raise ValueError(f"`bits` must be an integer in [2, 32] but is {bits}")
    return 2 ** (bits - 1) - 1


def max_level(bits: int) -> int:
    """Largest quantized value ``2h`` for ``bits`` bits."""
    return 2 * _half_levels(bits)


def quantize(values: np.ndarray, *, bits: int, clip: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Values clipped to ``[-clip, clip]`` -> unsigned levels in ``[0, 2h]``.

    Parameters
    ----------
    values : numpy.ndarray
        Float values, any shape.
    bits : int
        Bits per value, in [2, 32]; ``h = 2**(bits-1) - 1`` levels on each side of zero.
    clip : float
        Clip range (> 0). Values beyond it are clipped, which biases them; error feedback
        carries the clipped part to the next round.
    rng : numpy.random.Generator, optional
        Stochastic rounding (unbiased inside the clip range) when given; rounding to the
        nearest level when ``None``.

    Returns
    -------
    numpy.ndarray
        Levels in the smallest unsigned word that holds ``bits`` bits, same shape.
    """
    h = _half_levels(bits)
    if not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"`clip` must be a positive number but is {clip}")
    x = np.asarray(values, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("`values` hold NaN or inf; quantization needs finite values")
    scaled = (np.clip(x, -clip, clip) / clip + 1.0) * h  # in [0, 2h]
    if rng is None:
        q = np.rint(scaled)
    else:
        low = np.floor(scaled)
        q = low + (rng.random(scaled.shape) < (scaled - low))
    return np.clip(q, 0, 2 * h).astype(word_dtype(bits))


def dequantize(q: np.ndarray, *, bits: int, clip: float) -> np.ndarray:
    """Levels -> float64 values: ``(q - h) * clip / h``."""
    h = _half_levels(bits)
    return (np.asarray(q, dtype=np.float64) - h) * (clip / h)


def dequantize_mean(total: np.ndarray, *, weight: int, bits: int, clip: float) -> np.ndarray:
    """The weighted mean from ``total = sum_i w_i q_i`` and ``weight = sum_i w_i``."""
    if weight < 1:
        raise ValueError(f"`weight` must be a positive integer but is {weight}")
    h = _half_levels(bits)
    return (np.asarray(total, dtype=np.float64) / weight - h) * (clip / h)


# ---------------------------------------------------------------------------- error feedback

@dataclass(frozen=True)
class Compressed:
    """What a client sends and what it keeps.

    Attributes
    ----------
    q : numpy.ndarray
        Quantized levels on the support, shape ``(k,)``.
    sent : numpy.ndarray
        Dense float64 vector the server will see in the sum (dequantized ``q`` on the
        support), shape ``(size,)``.
    residual : numpy.ndarray
        Dense float64 vector kept for the next round, ``update + old residual - sent``.
    """

    q: np.ndarray
    sent: np.ndarray
    residual: np.ndarray


def clip_norm(values: np.ndarray, *, max_norm: float) -> np.ndarray:
    """``values`` scaled down to L2 norm ``max_norm`` if larger (``max_norm=0``: unchanged)."""
    if max_norm < 0:
        raise ValueError(f"`max_norm` must be >= 0 (0 turns clipping off) but is {max_norm}")
    norm = float(np.linalg.norm(values))
    if max_norm == 0 or norm <= max_norm:
        return np.asarray(values, dtype=np.float64)
    return np.asarray(values, dtype=np.float64) * (max_norm / norm)


def compress_update(
    *,
    update: np.ndarray,
    residual: np.ndarray | None,
    support: np.ndarray,
    bits: int,
    clip: float,
    norm_clip: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Compressed:
    """Error feedback + norm clipping + quantization of one client's flat update.

    Parameters
    ----------
    update : numpy.ndarray
        The client's flat update (local minus global), shape ``(size,)``; must be finite.
    residual : numpy.ndarray or None
        What the client did not send in earlier rounds (``None`` in its first round).
    support : numpy.ndarray
        This round's public coordinates.
    bits, clip, rng
        See :func:`quantize`.
    norm_clip : float
        Clip the L2 norm of the sent values to this before quantizing (0: off). With a
        unit weight each client's contribution to the sum is then bounded by
        ``norm_clip`` plus one quantization step per coordinate.

    Returns
    -------
    Compressed
        ``sent + residual == update + old residual`` up to float64 rounding.
    """
    x = np.asarray(update, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("`update` holds NaN or inf; the client must not send it (fix its training step)")
    if residual is not None:
        r = np.asarray(residual, dtype=np.float64).ravel()
        if r.shape != x.shape:
            raise ValueError(f"`residual` has {r.size} values but the update has {x.size}; "
                             "reset the residual when the adapter changes")
        x = x + r
    values = clip_norm(x[support], max_norm=norm_clip)
    q = quantize(values, bits=bits, clip=clip, rng=rng)
    sent = scatter(dequantize(q, bits=bits, clip=clip), support=support, size=x.size)
    return Compressed(q=q, sent=sent, residual=x - sent)


# ---------------------------------------------------------------------------- packing

def word_dtype(bits: int) -> np.dtype:
    """The smallest unsigned numpy word holding ``bits``-bit integers."""
    if not 1 <= bits <= 64:
        raise ValueError(f"`bits` must be in [1, 64] but is {bits}")
    for word in WORDS:
        if np.iinfo(word).bits >= bits:
            return np.dtype(word)
    raise AssertionError("unreachable")


def pack_words(values: np.ndarray, *, bits: int) -> np.ndarray:
    """Non-negative integers below ``2**bits`` -> the smallest word dtype (a copy)."""
    v = np.asarray(values)
    if v.dtype.kind not in "ui":
        raise ValueError(f"`values` must be integers but have dtype {v.dtype}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 2 ** bits):
        raise ValueError(f"`values` must lie in [0, 2**{bits}) but span [{int(v.min())}, {int(v.max())}]")
    return v.astype(word_dtype(bits))


def pack_bits(values: np.ndarray, *, bits: int) -> np.ndarray:
    """Non-negative integers below ``2**bits`` -> ``ceil(n * bits / 8)`` bytes (uint8).

    Value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream, most significant
    bit first; the pad bits of the last byte are zero.
    """
    v = pack_words(values, bits=bits).astype(">u8").ravel()
    stream = np.unpackbits(v.view(np.uint8)).reshape(-1, 64)[:, 64 - bits:]
    return np.packbits(stream.ravel())


def unpack_bits(packed: np.ndarray, *, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` uint64 values.

    Raises ``ValueError`` when the byte length is not ``ceil(count * bits / 8)`` or the
    pad bits are not zero (a corrupted or mis-sized payload).
    """
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim != 1:
        raise ValueError(f"`packed` must be a 1-D uint8 array but is {p.dtype} with shape {p.shape}")
    need = -(-count * bits // 8)
    if p.size != need:
        raise ValueError(f"`packed` has {p.size} bytes but {count} values of {bits} bits take {need}")
    stream = np.unpackbits(p)
    if stream[count * bits:].any():
        raise ValueError("`packed` has non-zero pad bits; the payload is corrupted")
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, 64 - bits:] = stream[:count * bits].reshape(count, bits)
    return np.packbits(full.ravel()).view(">u8").astype(np.uint64)


# ---------------------------------------------------------------------------- downlink

def encode_downlink(
    arrays: Mapping[str, np.ndarray], *, bits: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Global adapters -> per-tensor quantized levels and scales (deterministic).

    Each tensor ``x`` is quantized with ``clip = max|x|`` (zero is exact, the error is at
    most ``max|x| / (2h)`` per value). The server keeps its exact global; only the copy
    sent to clients is rounded, so the error does not accumulate over rounds.

    Returns
    -------
    tuple of dict
        ``(levels, scales)``: name -> levels (smallest word, original shape) and name ->
        ``max|x|`` (0.0 for an all-zero tensor).
    """
    levels: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    for name, arr in arrays.items():
        x = np.asarray(arr, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"global adapter {name!r} holds NaN or inf")
        scale = float(np.abs(x).max()) if x.size else 0.0
        scales[name] = scale
        levels[name] = quantize(x, bits=bits, clip=scale) if scale > 0 else np.full(
            x.shape, _half_levels(bits), dtype=word_dtype(bits))
    return levels, scales


def decode_downlink(
    levels: Mapping[str, np.ndarray], scales: Mapping[str, float], *, bits: int
) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_downlink`: name -> float32 arrays."""
    out: dict[str, np.ndarray] = {}
    for name, q in levels.items():
        if name not in scales:
            raise ValueError(f"downlink tensor {name!r} has no scale; the server sends one per tensor")
        scale = float(scales[name])
        arr = dequantize(q, bits=bits, clip=scale) if scale > 0 else np.zeros(np.shape(q))
        out[name] = arr.astype(np.float32)
    return out
