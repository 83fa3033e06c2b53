"""Secure aggregation in the SecAgg+ style (Bell et al., CCS 2020) on Flower's Message API.

Pure parts, each testable alone: :mod:`.shamir` (secret sharing over GF(2**256 + 297)),
:mod:`.keys` (X25519, HKDF, ChaCha20-Poly1305, share commitments), :mod:`.prg` (AES-256-CTR
expansion into Z_{2**m}), :mod:`.graph` (random Harary neighbour graph), :mod:`.masking`
(field size, weight folding, masks, packing). Protocol parts: :mod:`.params` (the public
round parameters), :mod:`.wire` (stage payloads and their records), :mod:`.client` and
:mod:`.server` (the two state machines). Flower parts: the client mod
:data:`.mod.secagg_mod` (``ClientApp(mods=[secagg_mod])``) and the strategy wrapper
:class:`guardedtuning.strategies.secure.SecureAggregation` around any Message-API
strategy. This package imports no torch, so a plain Flower ClientApp can install the mod.

Threat model: an honest-but-curious server and clients that may drop out or send
malformed replies at any stage. The server learns only the survivors' weighted sum and
total weight. Not covered: a malicious server that tells different clients different
survivor sets (SecAgg+ adds a signed consistency round for that), and poisoned but
well-formed inputs (a client can always send a wrong update inside the clip range).
"""

from guardedtuning.strategies.secagg.client import ClientSecAgg
from guardedtuning.strategies.secagg.mod import SecAggMod, secagg_mod
from guardedtuning.strategies.secagg.params import RoundParams
from guardedtuning.strategies.secagg.server import RoundRefused, SecureSum, ServerSecAgg

__all__ = ["ClientSecAgg", "RoundParams", "RoundRefused", "SecAggMod", "SecureSum", "ServerSecAgg", "secagg_mod"]
