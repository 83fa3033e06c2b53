"""Embedding inversion (c): optimise relaxed one-hot tokens through the bottom.

For a released batch ``h`` (B, T, D), the attacker looks for tokens whose *joint*
bottom output matches ``h``: each position holds a distribution ``softmax(z / tau)`` over
its ``K`` candidate tokens (the nearest-neighbour attack's top-K, so the search starts
from the best per-token guesses and the cost stays small), the expected word vector goes
through the bottom (white box) and ``sum_t ||bottom(x)_t - h_t||`` over real positions is
minimised with Adam. The L2 *norm* (not its square) is the negative log-likelihood of
d_chi noise. Unlike nearest neighbour, the match is contextual: attention mixes
positions, and the search picks the combination that explains the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardedtuning.models.split import Bottom
from guardedtuning.privacy.attacks.common import bottom_from_vectors


@dataclass
class OptimizationEIA:
    """Relaxed-token inversion of released activations through ``bottom``."""

    bottom: Bottom
    steps: int = 60
    lr: float = 0.2
    tau: float = 1.0

    def invert(self, h: torch.Tensor, attention_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, T, D) released, (B, T) mask, (B, T, K) candidate ids -> (B, T, K) ids, best first."""
        emb = self.bottom.word_embeddings().detach()
        device = emb.device
        cand = candidates.to(device)
        vectors = emb[cand]  # (B, T, K, D)
        target = h.to(device).float()
        mask = attention_mask.to(device)
        real = mask.bool()
        # start slightly in favour of the candidates' order (nearest first)
        k = cand.shape[-1]
        z = (-torch.arange(k, dtype=torch.float32, device=device) * 0.1).expand(*cand.shape).clone()
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        frozen = [p.requires_grad for p in self.bottom.parameters()]
        for p in self.bottom.parameters():
            p.requires_grad_(False)
        try:
            for _ in range(self.steps):
                w = torch.softmax(z / self.tau, dim=-1)  # (B, T, K)
                x = torch.einsum("btk,btkd->btd", w, vectors)
                out = bottom_from_vectors(self.bottom, x, mask)  # (B, T, D)
                loss = (out - target).norm(dim=-1)[real].sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            for p, f in zip(self.bottom.parameters(), frozen, strict=True):
                p.requires_grad_(f)
        order = z.detach().argsort(dim=-1, descending=True)
        return torch.gather(cand, -1, order).cpu()
