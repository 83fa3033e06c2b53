"""Attribute inference from pooled released representations.

The attacker pools each released sequence (the masked mean of its token vectors) and
predicts a sensitive attribute of the writer (e.g. the synthetic set's ``condition``,
``city`` or ``age_band``) with a classifier trained on auxiliary rows whose attributes
it knows, released through the same bottom and mechanism. Three classifiers, plain
torch: multinomial logistic regression, a one-hidden-layer MLP, and k-nearest
neighbours (cosine). Features are standardised with the auxiliary rows' statistics.
The attack success rate is accuracy on the victim's rows, reported beside the
majority-class rate (always guessing the most common attribute value of the victim's rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from guardedtuning.privacy.attacks.metrics import majority_rate

CLASSIFIERS = ("logreg", "mlp", "knn")


def pooled(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions: (B, T, D) -> (B, D)."""
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass
class AttributeInference:
    """One classifier (``logreg``, ``mlp`` or ``knn``) from pooled features to attribute values."""

    kind: str = "logreg"
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    k: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in CLASSIFIERS:
            raise ValueError(f"kind must be one of {', '.join(CLASSIFIERS)} but is {self.kind!r}")

    def fit(self, features: torch.Tensor, labels: Sequence[str]) -> AttributeInference:
        self.classes = sorted(set(labels))
        if len(self.classes) < 2:
            raise ValueError("attribute inference needs auxiliary rows with at least 2 attribute values")
        y = torch.tensor([self.classes.index(v) for v in labels])
        x = features.float()
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        x = (x - self.mean) / self.std
        if self.kind == "knn":
            self.train_x, self.train_y = nn.functional.normalize(x, dim=-1), y
            return self
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            d, c = x.shape[1], len(self.classes)
            self.model: nn.Module = (nn.Linear(d, c) if self.kind == "logreg"
                                     else nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, c)))
            opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            self.model.train()
            for _ in range(self.epochs):  # full batch: the auxiliary set is small
                loss = nn.functional.cross_entropy(self.model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.model.eval()
        return self

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> list[str]:
        x = (features.float() - self.mean) / self.std
        if self.kind == "knn":
            sim = nn.functional.normalize(x, dim=-1) @ self.train_x.T  # (n, m)
            idx = sim.topk(min(self.k, sim.shape[1]), dim=-1).indices  # (n, k)
            votes = nn.functional.one_hot(self.train_y[idx], len(self.classes)).sum(1)  # (n, C)
            pred = votes.argmax(-1)
        else:
            pred = self.model(x).argmax(-1)
        return [self.classes[int(i)] for i in pred]


def attribute_report(train_x: torch.Tensor, train_y: Sequence[str], test_x: torch.Tensor,
                     test_y: Sequence[str], *, kinds: Sequence[str] = CLASSIFIERS) -> dict[str, float]:
    """Accuracy of each classifier on the victim rows, and the majority-class rate."""
    out: dict[str, float] = {"majority_rate": majority_rate(list(test_y))}
    for kind in kinds:
        pred = AttributeInference(kind).fit(train_x, train_y).predict(test_x)
        out[kind] = sum(p == t for p, t in zip(pred, test_y, strict=True)) / len(test_y)
    out["asr"] = max(out[k] for k in kinds)
    return out
