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
:math:`\propto r^{d-1} e^{-\eta r}`, i.e. :math:`r \sim \mathrm{Gamma}(d, \text{rate}=\eta)`.
We draw the direction as a normalised standard normal vector and the magnitude as a sum
of ``d`` independent Exp(1) draws divided by :math:`\eta` (Gamma with integer shape is
exactly that sum). Both use the caller's :class:`torch.Generator`, which
``torch.distributions.Gamma`` cannot take. The cost is two draws per coordinate.
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
    return h * (clip / norms.clamp(min=1e-12)).clamp(max=1.0)


def sample_gamma_integer(
    shape: tuple[int, ...], *, k: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gamma(shape=k, rate=1) draws for integer ``k`` as sums of ``k`` Exp(1) draws (float64)."""
    e = torch.empty((*shape, k), dtype=torch.float64, device=device)
    e.exponential_(1.0, generator=generator)
    return e.sum(-1)


def sample_directions(
    shape: tuple[int, ...], *, dim: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Unit vectors uniform on the sphere in ``R^dim``: (*shape, dim), float64."""
    g = torch.randn((*shape, dim), dtype=torch.float64, device=device, generator=generator)
    return g / g.norm(dim=-1, keepdim=True).clamp(min=1e-300)


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
    r = sample_gamma_integer(shape, k=dim, generator=generator, device=device)  # (*shape,)
    if isinstance(eta, torch.Tensor):
        r = r / eta.to(device=device, dtype=torch.float64)
    else:
        r = r / float(eta)
    u = sample_directions(shape, dim=dim, generator=generator, device=device)  # (*shape, dim)
    return (u * r.unsqueeze(-1)).to(dtype)


def dchi_perturb(
    h: torch.Tensor, *, eta: float | torch.Tensor, clip: float, generator: torch.Generator
) -> torch.Tensor:
    """Clip each token vector of ``h`` (..., D) to ``clip`` (if > 0) and add d_chi noise."""
    x = clip_tokens(h, clip=clip)
    z = sample_dchi_noise(tuple(x.shape[:-1]), dim=x.shape[-1], eta=eta, generator=generator,
                          device=x.device, dtype=x.dtype)
    return x + z
