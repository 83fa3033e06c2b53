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
- Ed25519 (RFC 8032) identity keys: each client signs its round public keys and the
  survivor set it was told (:func:`round_keys_statement`, :func:`survivors_statement`), so
  its neighbours can tell a relayed key or set from one the server made up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
TAG_BYTES = 16
COMMIT_BYTES = 16
SIG_BYTES = 64
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


# ---------------------------------------------------------------------------- identity keys (Ed25519)

def new_identity() -> tuple[bytes, bytes]:
    """A fresh Ed25519 identity key pair as raw bytes ``(private, public)``, 32 bytes each."""
    sk = Ed25519PrivateKey.generate()
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption()), identity_public(sk)


def identity_public(private: bytes | Ed25519PrivateKey) -> bytes:
    """The raw Ed25519 public key of a raw (or loaded) private key."""
    sk = private if isinstance(private, Ed25519PrivateKey) else Ed25519PrivateKey.from_private_bytes(private)
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(private: bytes, statement: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``statement``."""
    return Ed25519PrivateKey.from_private_bytes(private).sign(statement)


def verify(public: bytes, signature: bytes, statement: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``statement`` (False for malformed keys)."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, statement)
    except (InvalidSignature, ValueError):
        return False
    return True


def round_keys_statement(*, context: bytes, node: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a client signs at ``advertise``: its two round keys, bound to the round context and its node id."""
    return b"gt-secagg/v2/round-keys/" + context + _ids(node) + c_pk + s_pk


def survivors_statement(*, context: bytes, node: int, survivors: list[int]) -> bytes:
    """What a client signs at ``consistency``: the survivor set it was told, bound to the round and its node id."""
    digest = hashlib.sha256(b"".join(v.to_bytes(8, "little") for v in sorted(survivors))).digest()
    return b"gt-secagg/v2/survivors/" + context + _ids(node) + digest
