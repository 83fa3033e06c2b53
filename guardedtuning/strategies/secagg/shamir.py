"""Shamir secret sharing over the prime field GF(2**256 + 297).

The field holds every 256-bit secret (X25519 private keys, self-mask seeds) in one
piece, so a secret needs one polynomial, not one per chunk. A share is the value of a
random polynomial of degree ``threshold - 1`` with constant term the secret, at the
holder's x-coordinate (``1 +`` its index among the round's participants); any
``threshold`` shares give the secret back by Lagrange interpolation at 0, fewer reveal
nothing about it. Shares travel as 33 big-endian bytes.

Not our own field arithmetic tricks: plain Python integers, ``pow(a, -1, p)`` for
inverses. Flower's ``flwr.common.secure_aggregation.crypto.shamir`` splits 16-byte
chunks through PyCryptodome (GF(2**128)); a 256-bit seed would need two polynomials
and padding, so we keep our own.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**256 + 297  # the smallest prime above 2**256
SECRET_BYTES = 32
SHARE_BYTES = 33


def split_int(
    secret: int, *, xs: Sequence[int], threshold: int, coefficients: Sequence[int] | None = None, prime: int = PRIME
) -> dict[int, int]:
    """Shares of ``secret`` at ``xs``: ``{x: f(x)}`` with ``f(0) = secret``.

    Parameters
    ----------
    secret : int
        In ``[0, prime)``.
    xs : sequence of int
        Distinct holder coordinates in ``[1, prime)``.
    threshold : int
        Shares needed to reconstruct (the polynomial has degree ``threshold - 1``),
        ``1 <= threshold <= len(xs)``.
    coefficients : sequence of int, optional
        ``threshold - 1`` coefficients of ``x, x**2, ...``; random (``secrets``) when
        omitted. Only tests pass them.
    prime : int
        Field modulus; only tests change it.
    """
    if not 0 <= secret < prime:
        raise ValueError(f"`secret` must lie in [0, prime) but is {secret}")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ValueError(f"`xs` must be distinct and in [1, prime) but are {list(xs)[:8]}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"`threshold` must be in [1, {len(xs)}] (the number of holders) but is {threshold}")
    if coefficients is None:
        coefficients = [secrets.randbelow(prime) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1:
        raise ValueError(f"`coefficients` must hold threshold - 1 = {threshold - 1} values, not {len(coefficients)}")
    poly = [secret, *coefficients]
    out: dict[int, int] = {}
    for x in xs:
        acc = 0
        for c in reversed(poly):  # Horner
            acc = (acc * x + c) % prime
        out[x] = acc
    return out


def lagrange_at_zero(xs: Sequence[int], *, prime: int = PRIME) -> list[int]:
    """Coefficients ``l_j`` with ``f(0) = sum_j l_j f(x_j)`` for distinct ``xs``.

    ``l_j = prod_{m != j} x_m / (x_m - x_j)``; the denominators are inverted together
    (one modular inverse and ``3t`` products instead of ``t`` inverses).
    """
    nums, dens = [], []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % prime
                den = den * (xm - xj) % prime
        nums.append(num)
        dens.append(den)
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % prime)
    inv = pow(prefix[-1], -1, prime)
    out = [0] * len(xs)
    for j in range(len(xs) - 1, -1, -1):  # inv holds 1 / (d_0 ... d_j)
        out[j] = nums[j] * inv * prefix[j] % prime
        inv = inv * dens[j] % prime
    return out


def combine_int(shares: Mapping[int, int], *, threshold: int, prime: int = PRIME) -> int:
    """The secret from at least ``threshold`` shares ``{x: y}`` (the smallest ``threshold`` xs are used)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares given but {threshold} are needed to reconstruct")
    xs = sorted(shares)[:threshold]
    coeffs = lagrange_at_zero(xs, prime=prime)
    return sum(c * shares[x] for c, x in zip(coeffs, xs, strict=True)) % prime


def split_secret(secret: bytes, *, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of a 32-byte secret, each as 33 bytes, keyed by holder coordinate."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"`secret` must be {SECRET_BYTES} bytes but is {len(secret)}")
    shares = split_int(int.from_bytes(secret, "big"), xs=xs, threshold=threshold)
    return {x: share_to_bytes(y) for x, y in shares.items()}


def combine_secret(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """The 32-byte secret from 33-byte shares ``{x: share}``; ``ValueError`` if inconsistent."""
    value = combine_int({x: share_from_bytes(s) for x, s in shares.items()}, threshold=threshold)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares do not interpolate to a 256-bit secret; at least one share is wrong")
    return value.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(y: int) -> bytes:
    if not 0 <= y < PRIME:
        raise ValueError(f"a share must lie in [0, {PRIME}) but is {y}")
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """A share from its 33 bytes; ``ValueError`` if the length or value is outside the field."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share must be {SHARE_BYTES} bytes but is {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("a share is outside the field (>= 2**256 + 297)")
    return y
