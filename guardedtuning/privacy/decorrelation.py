r"""Distance correlation (NoPeek) between a client's inputs and the activations it releases.

NoPeek (Vepakomma et al., 2020) adds :math:`w \cdot \mathrm{dCor}(X, H)` to the client's
loss, so the bottom learns activations that carry the task signal but resemble their
inputs less, which makes inversion harder. Distance correlation (Székely et al., 2007)
is 0 iff the two samples' distributions are independent (in the population) and 1 for
an exact similarity map. With pairwise distances :math:`a_{ij} = \lVert x_i - x_j\rVert`,
double centering :math:`A_{ij} = a_{ij} - \bar a_{i\cdot} - \bar a_{\cdot j} + \bar a_{\cdot\cdot}`
(same for :math:`B` from :math:`y`) and :math:`\mathrm{dCov}^2 = \frac{1}{n^2}\sum_{ij} A_{ij} B_{ij}`,

.. math:: \mathrm{dCor}(x, y) = \sqrt{\mathrm{dCov}^2(x, y) / \sqrt{\mathrm{dCov}^2(x, x)\,\mathrm{dCov}^2(y, y)}}.

This V-statistic is biased upward for small n (independent samples of size n give about
:math:`1/\sqrt{n}`); ``bias_corrected=True`` uses the U-centred estimator (Székely & Rizzo,
2014), whose squared value is unbiased and can be slightly negative (we then return 0).

Two levels (``privacy.nopeek-level``):

- ``token`` (default): for each example, the samples are its real tokens, x = the token's
  input embedding (the bottom's embedding output) and y = its released vector; the loss
  is the mean over examples. Each example's term depends on that example alone, so
  per-example gradients, and DP-SGD, stay valid.
- ``example``: NoPeek's original: the samples are the examples of the batch, each
  flattened (padding zeroed). It couples the batch and cannot be combined with DP-SGD.

Use it in the client's backward (the server's gradient plus the local term, with
:func:`guardedtuning.training.split_backward`)::

    split_backward(h, grad_h, extra_loss=weight * decorrelation_loss(x, h, mask))
"""

from __future__ import annotations

import torch

_EPS = 1e-10


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, n, p) -> (B, n, n) Euclidean distances, differentiable (zero, with zero gradient, on the diagonal)."""
    sq = (x * x).sum(-1)  # (B, n)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * x @ x.transpose(1, 2)).clamp(min=0.0)
    off = 1.0 - torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.sqrt(d2 + _EPS) * off


def _centred(d: torch.Tensor, m: torch.Tensor, bias_corrected: bool) -> torch.Tensor:
    """Double-centred (or U-centred) distances (B, n, n) over the valid samples ``m`` (B, n)."""
    n = m.sum(1)[:, None, None]  # (B, 1, 1)
    mm = m[:, :, None] * m[:, None, :]  # (B, n, n)
    d = d * mm
    rows = d.sum(2, keepdim=True)  # (B, n, 1)
    total = d.sum((1, 2), keepdim=True)  # (B, 1, 1)
    if not bias_corrected:
        c = d - rows / n - rows.transpose(1, 2) / n + total / (n * n)
        return c * mm
    c = d - rows / (n - 2) - rows.transpose(1, 2) / (n - 2) + total / ((n - 1) * (n - 2))
    off = 1.0 - torch.eye(d.shape[1], dtype=d.dtype, device=d.device)
    return c * mm * off


def distance_correlation(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias_corrected: bool = False,
) -> torch.Tensor:
    """Distance correlation of paired samples, differentiable.

    Parameters
    ----------
    x, y
        (n, p) and (n, q) samples, or batched (B, n, p) and (B, n, q).
    mask
        (n,) or (B, n): 1 for samples that count (e.g. real tokens).
    bias_corrected
        Use the U-centred estimator (needs n >= 4 valid samples).

    Returns
    -------
    torch.Tensor
        A scalar, or (B,) for batched input, in [0, 1]. A batch row with fewer than 2
        (4 when bias-corrected) valid samples, or a constant sample, gives 0.
    """
    single = x.dim() == 2
    if single:
        x, y = x[None], y[None]
        mask = None if mask is None else mask[None]
    m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    a = _centred(_pairwise_distances(x), m, bias_corrected)
    b = _centred(_pairwise_distances(y.to(x.dtype)), m, bias_corrected)
    xy = (a * b).sum((1, 2))
    xx = (a * a).sum((1, 2))
    yy = (b * b).sum((1, 2))
    denom = torch.sqrt((xx * yy).clamp(min=0.0))
    n = m.sum(1)
    ok = (denom > 1e-12) & (n >= (4 if bias_corrected else 2))
    r2 = torch.where(ok, xy / denom.clamp(min=1e-12), torch.zeros_like(xy)).clamp(min=0.0)
    r: torch.Tensor = torch.sqrt(r2 + _EPS) - _EPS**0.5  # smooth at 0
    return r[0] if single else r


def decorrelation_loss(
    inputs: torch.Tensor,
    activations: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    level: str = "token",
) -> torch.Tensor:
    """Mean NoPeek term for a batch: ``inputs`` and ``activations`` (B, T, D), mask (B, T).

    ``level="token"``: mean over examples of each example's dCor over its tokens;
    ``level="example"``: dCor over the batch's flattened examples. Multiply by
    ``privacy.nopeek-weight`` before adding it to the loss.
    """
    m = attention_mask.to(activations.dtype)
    x = inputs.detach().to(activations.dtype) * m[..., None]
    h = activations * m[..., None]
    if level == "token":
        per_example = distance_correlation(x, h, m)  # (B,)
        return per_example.mean()
    if level == "example":
        return distance_correlation(x.flatten(1), h.flatten(1))
    raise ValueError(f"level must be 'token' or 'example' but is {level!r}")
