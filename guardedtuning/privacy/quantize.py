"""Quantization of what crosses the cut, both ways: 8 or 4 bits per value, one scale per token.

One codec for both directions of split learning: the released activations (uplink,
``privacy.quantize-bits``) and the server's activation gradients (downlink,
``split.grad-bits``). It takes any ``(..., D)`` array: ``(B, T, D)`` as released, or the
``(N, D)`` rows of the real tokens when padding is trimmed (``split.trim-padding``,
:mod:`guardedtuning.wire.split`); a token's codes and scale do not depend on the others, so
trimming before or after quantizing gives the same arrays.

Each token vector v (D,) gets a symmetric scale ``s = max|v| / q`` (q = 127 for 8 bits,
7 for 4 bits) stored as float32, and codes in ``[-q, q]``: ``round(v / s)`` (nearest), or with
stochastic rounding (``split.stochastic-rounding``) ``floor(v / s + u)``, u ~ U[0, 1) drawn
from the caller's generator, so that E[codes * s] = v exactly. Dequantizing gives
``codes * s`` exactly (a float32 product): every coordinate is within ``s / 2`` of the
original under nearest rounding, within ``s`` under stochastic rounding. 8-bit codes are
stored offset by 128 in uint8; 4-bit codes offset by 8 and packed two per byte along the
last axis (low nibble first, an odd D padded with one nibble). The numpy arrays returned
are exactly what crosses the network, so their ``nbytes`` is the payload size.

Quantize *after* the privacy noise: it is post-processing of the released value (the
rounding's randomness is independent of the data) and keeps the token guarantee. The
server's gradient is taken at the dequantized activations and the client applies it to
its unquantized ones (a straight-through estimate); the gradient's own quantization is of
what the server computed and changes no guarantee either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QMAX = {8: 127, 4: 7}


@dataclass(frozen=True)
class QuantizedActivations:
    """What is sent: ``codes`` (..., D) uint8 or (..., ceil(D/2)) packed, ``scales`` (...) float32.

    The leading axes are (B, T) for a dense release or gradient, (N,) for the real tokens'
    rows of a trimmed one; the name stays for the uplink, the format serves both directions.
    """

    codes: np.ndarray
    scales: np.ndarray
    bits: int
    dim: int

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays that are sent (codes and scales)."""
        return int(self.codes.nbytes + self.scales.nbytes)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays for a message; ``meta`` = [bits, D] (int32) travels with them."""
        return {"codes": self.codes, "scales": self.scales, "meta": np.array([self.bits, self.dim], dtype=np.int32)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> QuantizedActivations:
        bits, dim = (int(v) for v in arrays["meta"])
        if bits not in QMAX:
            raise ValueError(f"quantized activations carry bits={bits}; expected 8 or 4")
        return cls(codes=arrays["codes"], scales=arrays["scales"], bits=bits, dim=dim)


def quantize_activations(h: torch.Tensor, *, bits: int, generator: torch.Generator | None = None
                         ) -> QuantizedActivations:
    """Quantize (..., D) values (activations or their gradients) with one float32 scale per token vector.

    Parameters
    ----------
    h : torch.Tensor
        (..., D) values, finite.
    bits : int
        8 or 4.
    generator : torch.Generator, optional
        A CPU generator: stochastic rounding with uniforms drawn from it (unbiased); None
        rounds to the nearest code (deterministic, error at most half a step).

    Returns
    -------
    QuantizedActivations
        The codes and scales as sent.
    """
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4 but is {bits}")
    q = QMAX[bits]
    x = h.detach().to("cpu", torch.float32).numpy()  # (..., D)
    scales = (np.abs(x).max(axis=-1, initial=0.0) / q).astype(np.float32)  # (...)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    if generator is None:
        rounded = np.rint(x / safe[..., None])
    else:  # floor(y + u), u ~ U[0, 1): P(up) = frac(y), so E[codes] = y (in float64: no bias from the sum)
        y = x.astype(np.float64) / safe[..., None].astype(np.float64)  # in [-q, q]
        u = torch.rand(y.shape, generator=generator, dtype=torch.float64).numpy()
        rounded = np.floor(y + u)
    codes = np.clip(rounded, -q, q).astype(np.int16)  # (..., D)
    codes = codes + (q + 1)  # 8 bit: 1..255, 4 bit: 1..15
    if bits == 8:
        return QuantizedActivations(codes.astype(np.uint8), scales, bits, x.shape[-1])
    if x.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), dtype=codes.dtype)], axis=-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # (..., ceil(D/2))
    return QuantizedActivations(packed, scales, bits, x.shape[-1])


def dequantize_activations(qa: QuantizedActivations) -> torch.Tensor:
    """(..., D) float32: ``codes * scale`` exactly."""
    q = QMAX[qa.bits]
    if qa.bits == 8:
        codes = qa.codes.astype(np.int16)
    else:
        low = (qa.codes & 0x0F).astype(np.int16)
        high = (qa.codes >> 4).astype(np.int16)
        codes = np.stack([low, high], axis=-1).reshape(*qa.codes.shape[:-1], 2 * qa.codes.shape[-1])[..., : qa.dim]
    values = (codes - (q + 1)).astype(np.float32) * qa.scales[..., None]
    return torch.from_numpy(values)
