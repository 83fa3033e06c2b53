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

The adaptive attack (:meth:`NearestNeighbourEIA.adaptive`) knows the mechanism's public
deterministic part: the clip, and PrivTune's mean-shift table (built from public
embeddings; the attacker builds it with the client's public settings). It compares a
release with ``clip(table[v]) + shift[v]`` for every candidate ``v``: the mean shift
then hides nothing, only the noise does. With a per-token eta (the attacker's public
estimate) it can also score by the d_chi log-likelihood ``D log eta_v - eta_v ||x - mu_v||``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardedtuning.models.split import Bottom
from guardedtuning.privacy.attacks.common import vocabulary_outputs
from guardedtuning.privacy.dchi import clip_tokens


@dataclass
class NearestNeighbourEIA:
    """Rank vocabulary tokens by distance to each released vector.

    ``table`` (N, D) holds one row per candidate token, ``vocab`` (N,) their ids. With
    ``eta`` (N,) (metric ``l2`` only) candidates are ranked by the d_chi log-likelihood
    ``D log eta_v - eta_v ||x - table[v]||`` instead of the distance alone.
    """

    table: torch.Tensor
    vocab: torch.Tensor
    metric: str = "l2"
    eta: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.metric not in ("l2", "cos"):
            raise ValueError(f"metric must be 'l2' or 'cos' but is {self.metric!r}")
        if self.table.shape[0] != self.vocab.shape[0]:
            raise ValueError(f"table has {self.table.shape[0]} rows but vocab has {self.vocab.shape[0]} ids")
        if self.eta is not None and (self.metric != "l2" or self.eta.shape != self.vocab.shape):
            raise ValueError(f"eta must be (N,) = {tuple(self.vocab.shape)} with metric 'l2', got shape "
                             f"{tuple(self.eta.shape)} and metric {self.metric!r}")
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

    @classmethod
    def adaptive(cls, bottom: Bottom, mechanism: object, *, vocab: torch.Tensor | None = None,
                 context: tuple[int, int] | None = None, use_eta: bool = False,
                 table: torch.Tensor | None = None) -> NearestNeighbourEIA:
        """The bottom table moved as ``mechanism`` moves a release: ``clip(table[v]) + mean_shift[v]``.

        ``mechanism`` is the attacker's copy of the client's mechanism (public settings,
        tables from public text); its ``clip``, ``mean_shift`` (V, D) and, with ``use_eta``,
        ``token_eta`` (V,) are read where it has them. ``table`` (N, D) reuses a bottom
        table already computed for ``vocab``.
        """
        emb = bottom.word_embeddings().detach()
        ids = vocab if vocab is not None else torch.arange(emb.shape[0])
        rows = table if table is not None else vocabulary_outputs(
            bottom, ids, context=context if bottom.kind == "encoder" else None)
        clip = float(getattr(mechanism, "clip", 0.0) or 0.0)
        if clip > 0:
            rows = clip_tokens(rows, clip=clip)
        shift = getattr(mechanism, "mean_shift", None)
        if shift is not None:
            if shift.shape[-1] != rows.shape[-1]:
                raise ValueError(f"the mechanism's mean shift has dimension {shift.shape[-1]} but the bottom "
                                 f"releases {rows.shape[-1]}: build the attacker's mechanism for this bottom")
            rows = rows + shift.detach().float().cpu()[ids]
        eta = getattr(mechanism, "token_eta", None) if use_eta else None
        return cls(rows, ids, "l2", None if eta is None else eta.detach().float().cpu()[ids])

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
            if self.eta is not None:  # d_chi log-likelihood of x around each row
                dist = ((x * x).sum(-1, keepdim=True) - score).clamp(min=0).sqrt()  # (n, N)
                score = d * self.eta.log() - self.eta * dist
            out.append(self.vocab[score.topk(min(k, self.table.shape[0]), dim=-1).indices])
        return torch.cat(out).reshape(b, t, -1)
