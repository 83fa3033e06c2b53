r"""d_chi-privacy (metric DP) noise for token vectors, sampled exactly.

The mechanism releases :math:`M(x) = x + z` with noise density

.. math:: p(z) \propto \exp(-\eta \lVert z \rVert_2), \qquad z \in \mathbb{R}^d .

For any two inputs and any output set :math:`S`,
:math:`P[M(x) \in S] \le e^{\eta \lVert x - x' \rVert_2} P[M(x') \in S]`: nearby vectors
are hard to tell apart, far ones less so. With every token vector first clipped to norm
``clip`` = C, any two differ by at most 2C, so each released token vector is also
:math:`2 \eta C`-DP (pure, local, per token vector).

Sampling: the density depends on :math:`z` only through :math:`r = \lVert z \rVert`, so
the direction is uniform on the sphere and, in polar coordinates, :math:`r` has density
:math:`\propto r^{d-1} e^{-\eta r}`, i.e. :math:`r \sim \mathrm{Gamma}(d, \text{rate}=\eta)`,
independent of the direction. We draw two standard normal vectors :math:`g, g' \in
\mathbb{R}^d`: the direction is :math:`g / \lVert g \rVert`, and
:math:`\tfrac12(\lVert g \rVert^2 + \lVert g' \rVert^2) \sim \tfrac12\chi^2_{2d} =
\mathrm{Gamma}(d, 1)`, so :math:`r` is that divided by :math:`\eta`. For an isotropic
Gaussian the norm and the direction are independent, so reusing :math:`\lVert g \rVert`
is exact. Everything comes from the caller's :class:`torch.Generator` (which
``torch.distributions.Gamma`` cannot take), at two normal draws per coordinate.
"""

from __future__ import annotations

import torch


def clip_tokens(h: torch.Tensor, *, clip: float) -> torch.Tensor:
    """Scale every token vector (last dim) down to L2 norm ``clip`` if it is longer.

    ``clip <= 0`` returns ``h`` unchanged. (..., D) -> (..., D).
    """
    if clip <= 0:
        return h
    norms = h.norm(dim=-1, keepdim=True)  # (..., 1)
    factor: torch.Tensor = (clip * norms.clamp(min=1e-12).reciprocal()).clamp(max=1.0)  # (..., 1)
    return h * factor


def sample_dchi_noise(
    shape: tuple[int, ...],
    *,
    dim: int,
    eta: float | torch.Tensor,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise vectors with density proportional to ``exp(-eta * ||z||)``, one per position.

    Parameters
    ----------
    shape
        Leading shape, e.g. ``(B, T)`` for one vector per token.
    dim
        Vector dimension ``d``.
    eta
        A positive float, or a tensor of shape ``shape`` giving each position its own eta
        (PrivTune's per-token scale).
    generator
        The source of randomness (see :mod:`guardedtuning.privacy.randomness`).

    Returns
    -------
    torch.Tensor
        (*shape, dim) noise in ``dtype``; the norms are Gamma(dim, rate=eta).
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn((*shape, 2, dim), dtype=work, device=device, generator=generator)  # (*shape, 2, dim)
    sq = (g * g).sum(-1)  # (*shape, 2): two independent chi^2_dim
    r = 0.5 * sq.sum(-1)  # (*shape,) ~ Gamma(dim, 1)
    r = r / (eta.to(device=device, dtype=work) if isinstance(eta, torch.Tensor) else float(eta))
    u = g[..., 0, :] / sq[..., 0:1].sqrt().clamp(min=1e-30)  # (*shape, dim) uniform on the sphere
    return (u * r.unsqueeze(-1)).to(dtype)


def dchi_perturb(
    h: torch.Tensor, *, eta: float | torch.Tensor, clip: float, generator: torch.Generator
) -> torch.Tensor:
    """Clip each token vector of ``h`` (..., D) to ``clip`` (if > 0) and add d_chi noise."""
    x = clip_tokens(h, clip=clip)
    z = sample_dchi_noise(tuple(x.shape[:-1]), dim=x.shape[-1], eta=eta, generator=generator,
                          device=x.device, dtype=x.dtype)
    return x + z
