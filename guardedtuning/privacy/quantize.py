"""Uplink quantization of released activations: 8 or 4 bits per value, one scale per token.

Each token vector v (D,) gets a symmetric scale ``s = max|v| / q`` (q = 127 for 8 bits,
7 for 4 bits) stored as float32, and codes ``round(v / s)`` in ``[-q, q]``. Dequantizing
gives ``codes * s`` exactly (a float32 product), and every coordinate is within ``s / 2``
of the original. 8-bit codes are stored offset by 128 in uint8; 4-bit codes offset by 8
and packed two per byte along the last axis (low nibble first, an odd D padded with one
nibble). The numpy arrays returned are exactly what crosses the network, so their
``nbytes`` is the uplink size.

Quantize *after* the privacy noise: it is post-processing and keeps the guarantee. The
server's gradient is taken at the dequantized activations and the client applies it to
its unquantized ones (a straight-through estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QMAX = {8: 127, 4: 7}


@dataclass(frozen=True)
class QuantizedActivations:
    """What is sent: ``codes`` (B, T, D) uint8 or (B, T, ceil(D/2)) packed, ``scales`` (B, T) float32."""

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


def quantize_activations(h: torch.Tensor, *, bits: int) -> QuantizedActivations:
    """Quantize (B, T, D) activations with one float32 scale per token vector."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4 but is {bits}")
    q = QMAX[bits]
    x = h.detach().to("cpu", torch.float32).numpy()  # (B, T, D)
    scales = (np.abs(x).max(axis=-1) / q).astype(np.float32)  # (B, T)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    codes = np.clip(np.rint(x / safe[..., None]), -q, q).astype(np.int16)  # (B, T, D)
    codes = codes + (q + 1)  # 8 bit: 1..255, 4 bit: 1..15
    if bits == 8:
        return QuantizedActivations(codes.astype(np.uint8), scales, bits, x.shape[-1])
    if x.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), dtype=codes.dtype)], axis=-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # (B, T, ceil(D/2))
    return QuantizedActivations(packed, scales, bits, x.shape[-1])


def dequantize_activations(qa: QuantizedActivations) -> torch.Tensor:
    """(B, T, D) float32: ``codes * scale`` exactly."""
    q = QMAX[qa.bits]
    if qa.bits == 8:
        codes = qa.codes.astype(np.int16)
    else:
        low = (qa.codes & 0x0F).astype(np.int16)
        high = (qa.codes >> 4).astype(np.int16)
        codes = np.stack([low, high], axis=-1).reshape(*qa.codes.shape[:-1], -1)[..., : qa.dim]
    values = (codes - (q + 1)).astype(np.float32) * qa.scales[..., None]
    return torch.from_numpy(values)
