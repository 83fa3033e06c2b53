"""A cryptographic PRG: a 256-bit seed -> a uniform vector in Z_{2**m}.

AES-256 in counter mode (key = seed, counter from zero) encrypts zero bytes; the key
stream is read as little-endian words and reduced mod ``2**m`` (uniform, since ``2**m``
divides the word range). Every seed is used for one vector of one round, so the fixed
counter start never repeats a key stream across purposes. Flower's SecAgg+ helper
(``pseudo_rand_gen``) folds its seed into 32 bits and uses NumPy's Mersenne twister;
this one keeps all 256 bits.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32


def expand(seed: bytes, *, length: int, bits: int) -> np.ndarray:
    """``length`` uniform values in ``[0, 2**bits)`` from ``seed``, as uint64.

    Parameters
    ----------
    seed : bytes
        32 bytes.
    length : int
        Number of values (>= 0).
    bits : int
        Field size ``m`` in [1, 64]; 4 key-stream bytes per value when ``m <= 32``, else 8.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"`seed` must be {SEED_BYTES} bytes but is {len(seed)}")
    if not 1 <= bits <= 64:
        raise ValueError(f"`bits` must be in [1, 64] but is {bits}")
    if length < 0:
        raise ValueError(f"`length` must be >= 0 but is {length}")
    word = np.dtype("<u4") if bits <= 32 else np.dtype("<u8")
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(length * word.itemsize))
    out = np.frombuffer(stream, dtype=word).astype(np.uint64)
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out
