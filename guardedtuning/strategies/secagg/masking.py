"""Arithmetic in Z_{2**m}: field size, weight folding, masks, and packing for transport.

A client's input is ``x = (w * q_1, ..., w * q_k, w)``: its quantized levels
``q_j in [0, 2h]`` times its integer weight ``w in [1, max_weight]``, and the weight
itself in the last slot. The server unmasks only the sum, ``sum_i w_i q_i`` and
``sum_i w_i``, which is all a weighted mean needs. The sum must not wrap, so

    m = bit_length(n * max_weight * 2h)          (at most 64)

for ``n`` participants: 8-bit levels (2h = 254) with unit weights give m = 11 for
n = 5 and m = 18 for n = 1000; ``max_weight = 1024`` adds 10 bits. Masked values are
uniform in Z_{2**m}, so they go as the smallest word holding ``m`` bits
(:func:`guardedtuning.codecs.pack_words`) or bit-packed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from guardedtuning.codecs import max_level, pack_bits, pack_words, unpack_bits, word_dtype
from guardedtuning.strategies.secagg.prg import expand

PACKINGS = ("word", "bits")


def field_bits(*, clients: int, bits: int, max_weight: int) -> int:
    """Smallest ``m`` with ``clients * max_weight * 2h < 2**m``; ``ValueError`` above 64."""
    if clients < 1 or max_weight < 1:
        raise ValueError(f"`clients` and `max_weight` must be positive but are {clients} and {max_weight}")
    m = (clients * max_weight * max_level(bits)).bit_length()
    if m > 64:
        raise ValueError(f"the sum of {clients} clients' {bits}-bit values times weights up to {max_weight} "
                         f"needs {m} bits (> 64); lower aggregation.max-weight or aggregation.bits")
    return m


def fold_weight(q: np.ndarray, *, weight: int, max_weight: int) -> np.ndarray:
    """``(w * q, w)`` as uint64, length ``k + 1``; ``weight`` must be in ``[1, max_weight]``."""
    if not 1 <= weight <= max_weight:
        raise ValueError(f"`weight` must be in [1, {max_weight}] but is {weight}")
    return np.append(np.asarray(q, dtype=np.uint64) * np.uint64(weight), np.uint64(weight))


def clamp_weight(num_examples: float, *, max_weight: int) -> int:
    """An example count as a weight: rounded, at least 1, at most ``max_weight`` (capped, not scaled)."""
    if not np.isfinite(num_examples) or num_examples <= 0:
        raise ValueError(f"`num_examples` must be a positive number but is {num_examples}")
    return int(min(max_weight, max(1, round(num_examples))))


def reduce(x: np.ndarray, *, bits: int) -> np.ndarray:
    """``x mod 2**bits`` for uint64 ``x`` (uint64 arithmetic wraps mod 2**64, a multiple)."""
    return x & np.uint64((1 << bits) - 1) if bits < 64 else x


def pair_sign(me: int, other: int) -> int:
    """+1 if ``me < other`` else -1: the two ends of a pair add opposite masks."""
    return 1 if me < other else -1


def apply_masks(x: np.ndarray, *, masks: list[tuple[int, np.ndarray]], bits: int) -> np.ndarray:
    """``x + sum(sign * mask) mod 2**bits`` for ``(sign, mask)`` pairs, all uint64."""
    out = np.asarray(x, dtype=np.uint64).copy()
    for sign, mask in masks:
        out = out + mask if sign > 0 else out - mask  # wraps mod 2**64
    return reduce(out, bits=bits)


def mask_input(
    x: np.ndarray, *, self_seed: bytes, pair_seeds: Mapping[int, bytes], me: int, bits: int
) -> np.ndarray:
    """``y = x + PRG(self_seed) + sum_j sign(me, j) PRG(pair_seed_j) mod 2**bits``."""
    n = len(x)
    masks = [(1, expand(self_seed, length=n, bits=bits))]
    masks += [(pair_sign(me, j), expand(s, length=n, bits=bits)) for j, s in sorted(pair_seeds.items())]
    return apply_masks(x, masks=masks, bits=bits)


def packed_dtype(*, bits: int, packing: str) -> np.dtype:
    """Transport dtype of a masked vector: the smallest word, or uint8 when bit-packed."""
    if packing not in PACKINGS:
        raise ValueError(f"`packing` must be one of {PACKINGS} but is {packing!r}")
    return word_dtype(bits) if packing == "word" else np.dtype(np.uint8)


def packed_length(*, length: int, bits: int, packing: str) -> int:
    """Transport length of a masked vector of ``length`` values."""
    packed_dtype(bits=bits, packing=packing)
    return length if packing == "word" else -(-length * bits // 8)


def pack_masked(y: np.ndarray, *, bits: int, packing: str) -> np.ndarray:
    """A masked vector (values in Z_{2**bits}) for transport."""
    packed_dtype(bits=bits, packing=packing)
    return pack_words(y, bits=bits) if packing == "word" else pack_bits(y, bits=bits)


def unpack_masked(packed: np.ndarray, *, bits: int, packing: str, length: int) -> np.ndarray:
    """Inverse of :func:`pack_masked` with full checks: dtype, shape, every value in the field.

    Raises ``ValueError`` naming what is wrong (a reply is rejected on it).
    """
    dtype = packed_dtype(bits=bits, packing=packing)
    p = np.asarray(packed)
    want = packed_length(length=length, bits=bits, packing=packing)
    if p.dtype != dtype:
        raise ValueError(f"masked vector has dtype {p.dtype}, expected {dtype} for a {bits}-bit field ({packing})")
    if p.shape != (want,):
        raise ValueError(f"masked vector has shape {p.shape}, expected ({want},)")
    if packing == "bits":
        return unpack_bits(p, bits=bits, count=length)
    y = p.astype(np.uint64)
    if bits < 64 and y.size and int(y.max()) >= 1 << bits:
        raise ValueError(f"masked vector holds {int(y.max())}, outside the field Z_2^{bits}")
    return y
