"""Key agreement, key derivation, share encryption and share commitments.

- X25519 (RFC 7748) for key agreement; every client makes two key pairs a round: the
  *channel* pair encrypts the shares it sends to its neighbours, the *mask* pair derives
  its pairwise mask seeds. They must differ: the server reconstructs a dropped client's
  mask key, and with it it must not be able to read that client's shares.
- HKDF-SHA256 turns a shared point into a 256-bit key, bound to the round context (a
  digest of every public round parameter) and to the two node ids, so a key is never
  reused across rounds, pairs, directions or purposes.
- ChaCha20-Poly1305 encrypts share payloads; each directional key encrypts exactly one
  message, so the all-zero nonce is safe. The associated data binds the context and
  the route, so the server cannot re-route a ciphertext.
- A share commitment (SHA-256, truncated to 128 bits) lets the server check a share a
  holder reveals against what the owner sent, and reject a wrong one by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
TAG_BYTES = 16
COMMIT_BYTES = 16
_NONCE = bytes(12)


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private, public)``, 32 bytes each."""
    sk = X25519PrivateKey.generate()
    priv = sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return priv, sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_of(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _ids(*nodes: int) -> bytes:
    return b"".join(n.to_bytes(8, "little") for n in nodes)


def agree(*, private: bytes, public: bytes, info: bytes) -> bytes:
    """X25519(private, public) through HKDF-SHA256 with ``info``: 32 bytes.

    Raises ``ValueError`` for a malformed or low-order public key (all-zero shared point).
    """
    if len(private) != KEY_BYTES or len(public) != KEY_BYTES:
        raise ValueError(f"X25519 keys are {KEY_BYTES} bytes; got {len(private)} and {len(public)}")
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def pair_seed(*, private: bytes, public: bytes, context: bytes, a: int, b: int) -> bytes:
    """The 256-bit pairwise mask seed of nodes ``a`` and ``b`` (symmetric in a, b)."""
    lo, hi = sorted((a, b))
    return agree(private=private, public=public, info=b"gt-secagg/pair-mask/" + context + _ids(lo, hi))


def pair_seeds(*, private: bytes, publics: Mapping[int, bytes], context: bytes, me: int) -> dict[int, bytes]:
    """:func:`pair_seed` of ``me`` with each ``node -> public key`` (the private key is loaded once)."""
    if len(private) != KEY_BYTES:
        raise ValueError(f"X25519 keys are {KEY_BYTES} bytes; got {len(private)}")
    sk = X25519PrivateKey.from_private_bytes(private)
    out = {}
    for node, public in publics.items():
        if len(public) != KEY_BYTES:
            raise ValueError(f"X25519 keys are {KEY_BYTES} bytes; got {len(public)} for node {node}")
        lo, hi = sorted((me, node))
        shared = sk.exchange(X25519PublicKey.from_public_bytes(public))
        out[node] = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                         info=b"gt-secagg/pair-mask/" + context + _ids(lo, hi)).derive(shared)
    return out


def channel_key(*, private: bytes, public: bytes, context: bytes, src: int, dst: int) -> bytes:
    """The one-message key for shares sent from ``src`` to ``dst``."""
    return agree(private=private, public=public, info=b"gt-secagg/channel/" + context + _ids(src, dst))


def seal(*, key: bytes, plaintext: bytes, context: bytes, src: int, dst: int) -> bytes:
    """Encrypt and authenticate ``plaintext`` for the route ``src -> dst``."""
    return ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, context + _ids(src, dst))


def open_sealed(*, key: bytes, ciphertext: bytes, context: bytes, src: int, dst: int) -> bytes:
    """Decrypt a :func:`seal` ciphertext; ``ValueError`` if it was altered or re-routed."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, ciphertext, context + _ids(src, dst))
    except InvalidTag as exc:
        raise ValueError(f"the ciphertext from node {src} to node {dst} does not authenticate") from exc


def commitment(*, context: bytes, owner: int, holder: int, kind: bytes, share: bytes) -> bytes:
    """128-bit commitment to the share of ``owner``'s secret ``kind`` held by ``holder``."""
    return hashlib.sha256(b"gt-secagg/commit/" + kind + b"/" + context + _ids(owner, holder) + share).digest()[
        :COMMIT_BYTES]
