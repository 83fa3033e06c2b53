"""Embedding inversion (d): the adaptive nearest neighbour, which knows the mechanism's mean shift.

PrivTune moves every released vector by a per-token mean shift (``shift[t]``, norm <= rho)
before the noise. The shift table is built from public embeddings with public settings,
so a curious server builds it too (the harness builds the attacker's PrivTune tables from
public auxiliary text with the client's settings). The attack then predicts, for every
candidate token ``v``, the mean of the release, ``clip(bottom(x)[v at p]) + shift[v]``, and
picks the nearest:

1. table stage (:meth:`NearestNeighbourEIA.adaptive
   <guardedtuning.privacy.attacks.eia_nn.NearestNeighbourEIA.adaptive>`): the bottom's
   per-token table (``[CLS] v [SEP]``), clipped and shifted as the mechanism does, ranks
   the whole vocabulary; its top ``k`` go on;
2. context stage (``sweeps`` > 0): a token's cut vector depends on its neighbours, which
   the table ignores. For each position in turn, each of the ``k`` candidates is put in
   the current best guess of the sequence, the bottom runs on it (white box) and the
   candidate whose predicted mean (clip, then shift) is nearest to the release wins.

Without noise the mean shift then hides nothing; only the noise does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from guardedtuning.models.split import Bottom
from guardedtuning.privacy.attacks.eia_nn import NearestNeighbourEIA
from guardedtuning.privacy.dchi import clip_tokens


@dataclass
class AdaptiveNN:
    """Nearest neighbour against the bottom's outputs moved by the mechanism's public mean shift.

    Parameters
    ----------
    bottom
        The client's bottom (white box).
    mechanism
        The attacker's copy of the client's mechanism (``clip``, ``mean_shift`` read where present).
    context
        ``(cls, sep)`` ids for the encoder's per-token table, or None.
    k
        Candidates per position kept from the table stage.
    sweeps
        Passes of the context stage over every position (0: the table stage alone).
    """

    bottom: Bottom
    mechanism: object
    context: tuple[int, int] | None = None
    k: int = 8
    sweeps: int = 1
    table: NearestNeighbourEIA | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.k < 1 or self.sweeps < 0:
            raise ValueError(f"k must be >= 1 and sweeps >= 0 but are {self.k} and {self.sweeps}")
        if self.table is None:
            self.table = NearestNeighbourEIA.adaptive(self.bottom, self.mechanism, context=self.context)
        self.clip = float(getattr(self.mechanism, "clip", 0.0) or 0.0)
        shift = getattr(self.mechanism, "mean_shift", None)
        self.shift = None if shift is None else shift.detach().float().cpu()

    def mean(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The release's mean for bottom outputs ``out`` (..., D) at tokens ``ids`` (...): clip, then shift."""
        m = clip_tokens(out, clip=self.clip) if self.clip > 0 else out
        return m + self.shift[ids] if self.shift is not None else m

    @torch.no_grad()
    def candidates(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) released vectors, (B, T) mask -> (B, T, k) token ids, best first."""
        assert self.table is not None
        cand = self.table.candidates(h, k=self.k)  # (B, T, K)
        if self.sweeps == 0:
            return cand
        b, t, k = cand.shape
        device = self.bottom.word_embeddings().device
        target = h.float().cpu()
        mask = attention_mask.cpu()
        ends = (mask * torch.arange(1, t + 1)).max(1).values  # (B,) one past each row's last real position
        current = cand[..., 0].clone()  # (B, T)
        order = cand.clone()
        for _ in range(self.sweeps):
            for p in range(t):
                rows = mask[:, p].bool().nonzero()[:, 0]  # only the rows where p is a real position
                if not len(rows):
                    continue
                width = int(ends[rows].max())  # later positions are padding in every selected row
                trial = current[rows, :width].repeat_interleave(k, 0)  # (n*K, W)
                trial[:, p] = cand[rows, p].reshape(-1)
                trial_mask = mask[rows, :width].repeat_interleave(k, 0)
                out = self.bottom(trial.to(device), trial_mask.to(device))[:, p].float().cpu()  # (n*K, D)
                mu = self.mean(out, trial[:, p]).reshape(len(rows), k, -1)
                dist = (mu - target[rows, p, None]).norm(dim=-1)  # (n, K)
                order[rows, p] = torch.gather(cand[rows, p], 1, dist.argsort(dim=-1))
                current[rows, p] = order[rows, p, 0]
        return order
