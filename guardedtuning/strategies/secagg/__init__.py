"""Secure aggregation in the SecAgg+ style (Bell et al., CCS 2020) on Flower's Message API.

Pure parts, each testable alone: :mod:`.shamir` (secret sharing over GF(2**256 + 297)),
:mod:`.keys` (X25519, HKDF, ChaCha20-Poly1305, share commitments, Ed25519 identity
signatures), :mod:`.prg` (AES-256-CTR expansion into Z_{2**m}), :mod:`.graph` (random
Harary neighbour graph; the degree, threshold and quorum a security parameter needs),
:mod:`.masking` (field size, weight folding, masks, packing). Protocol parts: :mod:`.params` (the public
round parameters), :mod:`.wire` (stage payloads and their records), :mod:`.client` and
:mod:`.server` (the two state machines). Flower parts: the client mod
:data:`.mod.secagg_mod` (``ClientApp(mods=[secagg_mod])``) and the strategy wrapper
:class:`guardedtuning.strategies.secure.SecureAggregation` around any Message-API
strategy. This package imports no torch, so a plain Flower ClientApp can install the mod.

Threat model (docs/threat-model.md): a malicious server colluding with at most a
fraction ``gamma`` of a round's clients (1/3 by default), and clients that may drop out
or send malformed replies at any stage. Clients refuse rounds whose degree, threshold
or quorum fall short of their :class:`~.graph.Policy`, sign their round keys and the
survivor set with a long-term Ed25519 identity key (pinned by their neighbours at first
sight), and reveal shares only after a quorum signed the same survivor set. An
honest-but-curious server learns only the survivors' weighted sum and total weight; a
malicious one can at most shrink the sum to a set it chooses, which still holds at
least two honest inputs (except with probability ``2**-sigma`` in a sparse graph).
Not covered: a server that substitutes keys in the clients' very first round (trust on
first use), and poisoned but well-formed inputs (a client can always send a wrong
update inside the clip range).
"""

from guardedtuning.strategies.secagg.client import ClientSecAgg
from guardedtuning.strategies.secagg.mod import SecAggMod, secagg_mod
from guardedtuning.strategies.secagg.params import RoundParams
from guardedtuning.strategies.secagg.server import RoundRefused, SecureSum, ServerSecAgg

__all__ = ["ClientSecAgg", "RoundParams", "RoundRefused", "SecAggMod", "SecureSum", "ServerSecAgg", "secagg_mod"]
