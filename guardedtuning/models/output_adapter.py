"""The ``gradfree`` client's trainable end: an output adapter and the task head.

In ``gradfree`` the server returns the hidden states its frozen middle and top computed
from the client's released activations, ``z`` (B, T, D) (after the final norm for
decoders). The client turns them into a loss on its own labels with

- an output adapter: a residual bottleneck ``z + up(gelu(down(z)))`` applied to every
  token (``up`` starts at zero, so training starts from the plain hidden states;
  ``gradfree.adapter-dim`` = 0 leaves it out);
- the head: for encoders a masked mean pool and a linear classifier (as
  :class:`~guardedtuning.models.split.Top`), for decoders the model's LM head (frozen;
  tied to the input embeddings the client's bottom already holds), with the loss on
  response tokens only.

The adapter runs on the whole (B, T, D) tensor before any masking, so Opacus sees a
batch-first input and per-example gradients stay exact under DP-SGD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from guardedtuning.models.split import IGNORE, Bottom, Top, weight_dtype


class OutputAdapter(nn.Module):
    """``z + up(gelu(down(z)))`` per token: (B, T, D) -> (B, T, D); identity at initialisation."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(F.gelu(self.down(z)))


class GradfreeHead(nn.Module):
    """Output adapter + head on the server's returned hidden states; only this trains.

    ``lm_head`` (decoders) is the model's frozen LM head; encoders get a fresh linear
    classifier with ``num_labels`` outputs.
    """

    def __init__(self, kind: str, hidden: int, num_labels: int, adapter_dim: int,
                 lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.adapter: nn.Module = OutputAdapter(hidden, adapter_dim) if adapter_dim > 0 else nn.Identity()
        if kind == "encoder":
            self.head: nn.Module = nn.Linear(hidden, num_labels)
        else:
            if lm_head is None:
                raise ValueError("a decoder's GradfreeHead needs the model's lm_head")
            self.head = lm_head
            self.head.requires_grad_(False)

    def logits(self, z: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder: (B, C) class logits. Decoder: (B, T, V) next-token logits."""
        a = self.adapter(z)  # (B, T, D)
        if self.kind == "encoder":
            m = attention_mask.unsqueeze(-1).to(a.dtype)  # (B, T, 1)
            return self.head((a * m).sum(1) / m.sum(1).clamp(min=1.0))  # (B, C)
        return self.head(a.to(weight_dtype(self.head))).float()  # the LM head may be bf16 (model.dtype)

    def per_example_loss(self, z: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) loss of each example: cross-entropy, or mean response-token NLL."""
        if self.kind == "encoder":
            return F.cross_entropy(self.logits(z, attention_mask), labels, reduction="none")
        a = self.adapter(z)[:, :-1]  # (B, T-1, D) predicts token t+1
        target = labels[:, 1:]  # (B, T-1)
        keep = target != IGNORE
        logits = self.head(a[keep].to(weight_dtype(self.head))).float()  # (N, V)
        nll = F.cross_entropy(logits, target[keep], reduction="none")  # (N,)
        per_row = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device)
        per_row.index_add_(0, keep.nonzero()[:, 0], nll)
        return per_row / keep.sum(1).clamp(min=1).to(nll.dtype)


class GradfreeModel(nn.Module):
    """The assembled ``gradfree`` model (client bottom, server middle and top, client head), for evaluation."""

    def __init__(self, bottom: Bottom, top: Top, head: GradfreeHead) -> None:
        super().__init__()
        self.bottom = bottom
        self.top = top
        self.head = head
        self.kind = bottom.kind

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.top.hidden(self.bottom(input_ids, attention_mask), attention_mask)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.hidden(input_ids, attention_mask), attention_mask)

    def per_example_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
        return self.head.per_example_loss(self.hidden(input_ids, attention_mask), attention_mask, labels)


def build_gradfree_head(kind: str, hidden: int, num_labels: int, adapter_dim: int, *, seed: int,
                        lm_head: nn.Module | None = None) -> GradfreeHead:
    """A seeded :class:`GradfreeHead` (leaves the process's random state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return GradfreeHead(kind, hidden, num_labels, adapter_dim, lm_head=lm_head).eval()
