"""Embedding inversion (b): a learned inversion model, trained on auxiliary text.

The attacker passes its own public text through the same bottom and the same released
mechanism (at several noise levels: noise-aware), and fits a model from each released
sequence back to its tokens. Two models:

- ``mlp``: each released vector alone -> token (D -> hidden -> N);
- ``transformer``: a small bidirectional transformer over the whole released sequence
  (positions learned), so a token is read with its neighbours -> token per position.

The output vocabulary is the auxiliary text's own (``N`` most frequent non-special
tokens): a token the attacker never saw cannot be named, which is the realistic limit
of this attack. Training minimises cross-entropy on non-special positions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from guardedtuning.data.batches import Batch
from guardedtuning.privacy.attacks.common import Releaser
from guardedtuning.privacy.attacks.metrics import content_positions


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_out))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(h)  # (B, T, N)


class _Transformer(nn.Module):
    def __init__(self, dim: int, hidden: int, n_out: int, *, layers: int = 2, heads: int = 4,
                 max_len: int = 512) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden))
        self.pos = nn.Embedding(max_len, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, n_out))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        x = self.inp(h) + self.pos(torch.arange(t, device=h.device))[None]  # (B, T, H)
        x = self.body(x, src_key_padding_mask=~mask.bool())
        return self.out(x)  # (B, T, N)


@dataclass
class LearnedInversion:
    """A learned EIA: :meth:`fit` on auxiliary batches, :meth:`candidates` on released vectors."""

    vocab: torch.Tensor  # (N,) token ids the model can name
    dim: int
    special: tuple[int, ...]
    arch: str = "mlp"
    hidden: int = 512
    seed: int = 0
    model: nn.Module = field(init=False)
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.arch not in ("mlp", "transformer"):
            raise ValueError(f"arch must be 'mlp' or 'transformer' but is {self.arch!r}")
        if self.vocab.numel() == 0:
            raise ValueError("the auxiliary vocabulary is empty: pass auxiliary text with non-special tokens")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            n = int(self.vocab.numel())
            self.model = (_MLP(self.dim, self.hidden, n) if self.arch == "mlp"
                          else _Transformer(self.dim, min(self.hidden, 256), n))
        lookup = torch.full((int(self.vocab.max()) + 1,), -1, dtype=torch.long)
        lookup[self.vocab] = torch.arange(self.vocab.numel())
        self._lookup = lookup

    def targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) class index of each position; -100 where it does not count or is out of vocabulary."""
        ids = input_ids.clamp(max=self._lookup.numel() - 1)
        cls = torch.where(input_ids < self._lookup.numel(), self._lookup[ids], torch.full_like(ids, -1))
        keep = content_positions(input_ids, attention_mask, self.special) & (cls >= 0)
        return torch.where(keep, cls, torch.full_like(cls, -100))

    def fit(self, batches: Sequence[Batch], releasers: Sequence[Releaser], *, epochs: int = 4,
            lr: float = 2e-3, log: Callable[[str], None] | None = None, max_seconds: float = 0.0) -> None:
        """Train on every auxiliary batch released by every releaser (the noise levels), shuffled.

        Releases are drawn afresh each epoch, so the model sees new noise every time.
        ``max_seconds`` > 0 stops early after that much training time.
        """
        if not releasers:
            raise ValueError("fit needs at least one releaser (the mechanism at one noise level)")
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        total = epochs * len(batches) * len(releasers)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.1)
        gen = torch.Generator().manual_seed(self.seed)
        t0 = time.perf_counter()
        self.model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(batches) * len(releasers), generator=gen).tolist()
            losses = []
            for j in order:
                b, rel = batches[j // len(releasers)], releasers[j % len(releasers)]
                y = self.targets(b.input_ids, b.attention_mask)
                if not bool((y >= 0).any()):
                    continue
                with torch.no_grad():
                    h = rel(b)
                logits = self.model(h, b.attention_mask)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                   ignore_index=-100)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if max_seconds and time.perf_counter() - t0 > max_seconds:
                    break
            self.history.append(sum(losses) / max(1, len(losses)))
            if log is not None:
                log(f"{self.arch} inversion epoch {epoch + 1}/{epochs}: loss {self.history[-1]:.3f}")
            if max_seconds and time.perf_counter() - t0 > max_seconds:
                break
        self.model.eval()
        if self.history and not math.isfinite(self.history[-1]):
            raise RuntimeError("learned inversion diverged (non-finite loss); lower its learning rate")

    @torch.no_grad()
    def candidates(self, h: torch.Tensor, attention_mask: torch.Tensor, *, k: int = 5) -> torch.Tensor:
        """(B, T, D) released vectors -> (B, T, k) token ids, most likely first."""
        self.model.eval()
        logits = self.model(h.float(), attention_mask)
        return self.vocab[logits.topk(min(k, logits.shape[-1]), dim=-1).indices]
