"""Generators for privacy noise and DP sampling.

Every random draw a guarantee rests on (d_chi noise, DP-SGD noise, Poisson sampling) takes
a :class:`torch.Generator` or a seed. Which one is used is a privacy decision, not a
convenience:

- the guarantee holds only if the party it protects against can neither predict nor
  repeat the draws. A seed derived from the run config (``seed``) is known to the server,
  which could subtract the noise; a stream keyed by anything the server sends (the round,
  the step) can be replayed: the server asks for the same step twice with two adapters and
  the difference of the releases is the difference of the clean activations. So every draw
  of a client takes a generator seeded from fresh OS entropy (:func:`fresh_generator`,
  :func:`fresh_seed`: :mod:`secrets`, a new seed per draw), and what must be recomputed
  later (a step's Poisson rows) is kept in the client's state, not re-derived;
- :func:`make_generator` (a stream of a fixed seed) is for ``privacy.noise-seed >= 0``,
  an explicit opt-in for tests and benchmarks that voids the guarantee, and for the
  server's own draws;
- torch's CPU generator is a Mersenne Twister, not a cryptographic generator: good
  against an honest-but-curious server that does not attack the generator itself, not
  against one that does (Opacus's ``secure_mode`` addresses that with torchcsprng).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

# stream labels, so that one client seed gives independent streams per purpose
STREAM_TOKEN_NOISE = 1
STREAM_DP_NOISE = 2
STREAM_DP_SAMPLING = 3


def fresh_seed() -> int:
    """A new 63-bit seed from the operating system's CSPRNG (:mod:`secrets`), for one draw."""
    return secrets.randbits(63)


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from fresh OS entropy: use it for one draw, then drop it.

    Nothing the server sends enters its seed, so no message can make two draws equal.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(fresh_seed())
    return gen


def derive_seed(seed: int, *stream: int) -> int:
    """A 64-bit seed for the stream ``(seed, *stream)`` (numpy's SeedSequence mixing)."""
    words = np.random.SeedSequence([int(seed), *(int(s) for s in stream)]).generate_state(1, np.uint64)
    return int(words[0])


def make_generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` for the stream ``(seed, *stream)``.

    E.g. ``make_generator(seed, STREAM_TOKEN_NOISE, client, step)``.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *stream))
    return gen
