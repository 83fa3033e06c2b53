"""Embedding inversion (e): a learned linear inverse map, ridge regression in closed form.

The attacker releases its public auxiliary text through the exact mechanism (the
client's public settings, noise drawn afresh for every pass) and fits a linear map from
each released vector ``x`` (D,) (with a bias) to the one-hot of its token over the
auxiliary vocabulary (N most frequent non-special tokens):

.. math:: W = (X^\\top X + \\lambda I)^{-1} X^\\top Y,

accumulated over batches as the sufficient statistics ``X^T X`` (D+1, D+1) and ``X^T Y``
(D+1, N) (one-hot rows: an index-add), so memory does not grow with the text. The
penalty ``lambda`` is picked from a grid (multiples of ``tr(X^T X) / (D+1)``) by top-1 on a
held-out share of the auxiliary releases, through one eigendecomposition. A released
vector's candidates are the largest entries of ``x W``. Like the learned attacks, it can
only name tokens the auxiliary text holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from guardedtuning.data.batches import Batch
from guardedtuning.privacy.attacks.common import Releaser
from guardedtuning.privacy.attacks.metrics import content_positions

LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class RidgeInversion:
    """Ridge regression from a released vector to its token's one-hot: :meth:`fit`, then :meth:`candidates`."""

    vocab: torch.Tensor  # (N,) token ids the map can name
    special: tuple[int, ...]
    lambdas: tuple[float, ...] = LAMBDAS
    weight: torch.Tensor | None = field(default=None, repr=False)  # (D + 1, N)
    chosen: float | None = None

    def __post_init__(self) -> None:
        if self.vocab.numel() == 0:
            raise ValueError("the auxiliary vocabulary is empty: pass auxiliary text with non-special tokens")
        lookup = torch.full((int(self.vocab.max()) + 1,), -1, dtype=torch.long)
        lookup[self.vocab] = torch.arange(self.vocab.numel())
        self._lookup = lookup

    def _rows(self, b: Batch, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Released vectors with a bias column (M, D+1) and their class index (M,), known tokens only."""
        keep = content_positions(b.input_ids, b.attention_mask, self.special)
        ids = b.input_ids[keep]
        known = ids < self._lookup.numel()
        cls = torch.full_like(ids, -1)
        cls[known] = self._lookup[ids[known]]
        x = h[keep].double()
        sel = cls >= 0
        return torch.cat([x[sel], torch.ones((int(sel.sum()), 1), dtype=torch.float64)], 1), cls[sel]

    def fit(self, batches: Sequence[Batch], releasers: Sequence[Releaser], *, passes: int = 2,
            holdout: float = 0.2) -> RidgeInversion:
        """Accumulate the statistics over ``passes`` fresh releases of every batch by every releaser.

        The last ``holdout`` share of batches (at least one when there are two or more) picks
        lambda; the map is then refit on all of them.
        """
        if not releasers or not batches:
            raise ValueError("ridge inversion needs at least one auxiliary batch and one releaser")
        n_val = max(1, int(len(batches) * holdout)) if len(batches) > 1 else 0
        n = int(self.vocab.numel())
        xtx = torch.zeros((2, 0, 0), dtype=torch.float64)  # [training part, held-out part], sized on first rows
        xty = torch.zeros((2, 0, n), dtype=torch.float64)
        val: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(passes):
            for i, b in enumerate(batches):
                part = int(i >= len(batches) - n_val)
                for rel in releasers:
                    with torch.no_grad():
                        x, y = self._rows(b, rel(b).float().cpu())
                    if not len(y):
                        continue
                    if xtx.shape[1] == 0:
                        d = x.shape[1]
                        xtx, xty = torch.zeros((2, d, d), dtype=torch.float64), torch.zeros((2, d, n),
                                                                                           dtype=torch.float64)
                    xtx[part] += x.T @ x
                    xty[part].index_add_(1, y, x.T)
                    if part:
                        val.append((x, y))
        if xtx.shape[1] == 0:
            raise ValueError("the auxiliary batches hold no token of the vocabulary: nothing to fit")
        if val and bool(xtx[0].any()):
            w = self._solve(xtx[0], xty[0], self.lambdas)
            scores = {lam: self._accuracy(w[lam], val) for lam in self.lambdas}
            self.chosen = max(scores, key=lambda lam: (scores[lam], lam))
        else:
            self.chosen = self.lambdas[len(self.lambdas) // 2]
        xtx_all, xty_all = xtx.sum(0), xty.sum(0)
        self.weight = self._solve(xtx_all, xty_all, [self.chosen])[self.chosen].float()
        return self

    @staticmethod
    def _solve(xtx: torch.Tensor, xty: torch.Tensor, lambdas: Sequence[float]) -> dict[float, torch.Tensor]:
        evals, evecs = torch.linalg.eigh(xtx)
        proj = evecs.T @ xty  # (D+1, N)
        scale = float(evals.clamp(min=0).sum()) / xtx.shape[0]
        return {lam: evecs @ (proj / (evals.clamp(min=0) + lam * scale)[:, None]) for lam in lambdas}

    @staticmethod
    def _accuracy(w: torch.Tensor, val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        hit = sum(int(((x @ w).argmax(-1) == y).sum()) for x, y in val)
        return hit / max(1, sum(len(y) for _, y in val))

    @torch.no_grad()
    def candidates(self, h: torch.Tensor, *, k: int = 5) -> torch.Tensor:
        """(B, T, D) released vectors -> (B, T, k) token ids, most likely first."""
        if self.weight is None:
            raise RuntimeError("fit the ridge map before asking for candidates")
        x = h.float().cpu()
        scores = x @ self.weight[:-1] + self.weight[-1]  # (B, T, N)
        return self.vocab[scores.topk(min(k, scores.shape[-1]), dim=-1).indices]
