"""Embedding inversion (a): nearest neighbour against a vocabulary table.

For every released token vector the attacker ranks vocabulary tokens by their distance
to a table row:

- ``table="embedding"``: the input embedding matrix (V, D). Right at the cut after the
  embedding layer, and still strong after a few blocks, because the residual stream keeps
  the input embedding;
- ``table="bottom"``: the bottom's own output for each vocabulary token seen alone
  (``[CLS] t [SEP]`` for encoders), i.e. the embedding pushed through the same blocks.

Distances are L2 (the maximum-likelihood decoder for isotropic d_chi noise around a
table row) or cosine. The attacker may restrict candidates to a vocabulary it cares
about (``vocab``), e.g. every non-special token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardedtuning.models.split import Bottom
from guardedtuning.privacy.attacks.common import vocabulary_outputs


@dataclass
class NearestNeighbourEIA:
    """Rank vocabulary tokens by distance to each released vector.

    ``table`` (N, D) holds one row per candidate token, ``vocab`` (N,) their ids.
    """

    table: torch.Tensor
    vocab: torch.Tensor
    metric: str = "l2"

    def __post_init__(self) -> None:
        if self.metric not in ("l2", "cos"):
            raise ValueError(f"metric must be 'l2' or 'cos' but is {self.metric!r}")
        if self.table.shape[0] != self.vocab.shape[0]:
            raise ValueError(f"table has {self.table.shape[0]} rows but vocab has {self.vocab.shape[0]} ids")
        self.table = self.table.float()
        if self.metric == "cos":
            self.table = torch.nn.functional.normalize(self.table, dim=-1)
        self._sq = (self.table * self.table).sum(-1)  # (N,)

    @classmethod
    def from_bottom(cls, bottom: Bottom, *, table: str = "embedding", metric: str = "l2",
                    vocab: torch.Tensor | None = None, context: tuple[int, int] | None = None) -> NearestNeighbourEIA:
        """The attack against ``bottom``'s vocabulary (all of it unless ``vocab`` is given)."""
        emb = bottom.word_embeddings().detach().float().cpu()
        ids = vocab if vocab is not None else torch.arange(emb.shape[0])
        if table == "embedding":
            rows = emb[ids]
        elif table == "bottom":
            rows = vocabulary_outputs(bottom, ids, context=context if bottom.kind == "encoder" else None)
        else:
            raise ValueError(f"table must be 'embedding' or 'bottom' but is {table!r}")
        return cls(rows, ids, metric)

    @torch.no_grad()
    def candidates(self, h: torch.Tensor, *, k: int = 5, chunk: int = 1024) -> torch.Tensor:
        """(B, T, D) released vectors -> (B, T, k) token ids, nearest first."""
        b, t, d = h.shape
        flat = h.reshape(-1, d).float()
        if self.metric == "cos":
            flat = torch.nn.functional.normalize(flat, dim=-1)
        out = []
        for start in range(0, flat.shape[0], chunk):
            x = flat[start:start + chunk]  # (n, D)
            score = 2 * x @ self.table.T - self._sq  # larger = closer: -||x - e||^2 + ||x||^2
            out.append(self.vocab[score.topk(min(k, self.table.shape[0]), dim=-1).indices])
        return torch.cat(out).reshape(b, t, -1)
