"""Split a backbone at block ``k`` into a client bottom and a server top.

- bottom: token embeddings and the first ``k`` blocks; ``forward(input_ids, mask)``
  returns the cut activations ``h`` of shape (B, T, D) that the client releases;
- top: the remaining blocks and a task head; it turns ``h`` back into a loss.

With a low-dimensional release (``split.release-dim`` = k > 0) the bottom ends in a trainable
linear map D -> k (:class:`ReleaseProjection`) and the top starts with a trainable map k -> D:
the client releases k numbers per token instead of D, and the token noise is added in that
k-dimensional space (the d_chi noise norm grows with the released dimension, k / eta, while a
task such as sentiment needs only a few directions of each contextual token vector).

The encoder's head is a masked mean pool and a linear classifier (sequence
classification); the decoder's head is the final norm and the LM head, with the
causal-LM loss taken on response tokens only (labels of -100 are ignored).

Without a release projection, bottom then top computes exactly what the unsplit model computes (tested).

Precision (``model.dtype``): the blocks run in their weights' dtype (bfloat16 or float16 base
weights), and everything around them is float32: the embeddings' output handed to the blocks,
the release (so the token noise is drawn and added in float32 and the wire carries float32),
the release maps, the top's hidden states, the encoder's head and every logit the loss sees. The
crossings are casts at :meth:`_Blocks.run` (in), :meth:`Bottom.release` and :meth:`Top.hidden`
(out), and around a decoder's frozen LM head; peft casts a LoRA layer's input to its float32
weights and its sum back to the base layer's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from guardedtuning.errors import ModelLoadError
from guardedtuning.models.loading import Backbone

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

IGNORE = -100


def check_split_layer(layer: int, num_layers: int, name: str) -> None:
    if not 1 <= layer < num_layers:
        raise ModelLoadError(
            f"`split.layer` is {layer} but {name!r} has {num_layers} blocks; pass "
            f"--set split.layer=K with 1 <= K <= {num_layers - 1}"
        )


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s base (non-LoRA) weights: what its blocks compute in."""
    for name, p in module.named_parameters():
        if "lora_" not in name:
            return p.dtype
    return torch.float32


def cast_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``module``'s parameters (not its buffers: rotary frequencies stay float32) in place.

    Each Parameter object is kept (tied weights stay tied; optimizers and Opacus see the same
    tensors); float32 is a no-op.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.to(dtype)


def _inputs_embeds_to_weight_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: float32 ``inputs_embeds`` (the attacks' relaxed tokens) in the embeddings' dtype."""
    x = kwargs.get("inputs_embeds")
    if x is not None:
        kwargs["inputs_embeds"] = x.to(weight_dtype(module))
    return args, kwargs


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _Blocks(nn.Module):
    """Runs a slice of a backbone's blocks with the family's mask and positions."""

    def __init__(self, backbone: Backbone, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.kind = backbone.kind
        self.config = backbone.config
        self.layers = nn.ModuleList(blocks)
        self.rotary_emb = backbone.body.rotary_emb if backbone.kind == "decoder" else None

    def run(self, h: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D) through this slice of blocks.

        ``cache`` (decoders, generation only): a transformers ``Cache`` holding the keys and
        values of the positions already seen, by the backbone's global layer index, so the
        bottom's and the top's blocks share one cache as the unsplit model's layers do.
        ``h`` is then the new positions only and ``attention_mask`` covers the seen positions
        and the new ones, (B, past + T), as in the unsplit model's ``forward``. Without a
        cache every call sees the whole sequence (training, the attacks).
        """
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        h = h.to(weight_dtype(self.layers))  # float32 in, the base weights' dtype inside
        if self.kind == "encoder":
            if cache is not None:
                raise ValueError("`cache` is for decoders (incremental generation); an encoder takes none")
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask)
            for layer in self.layers:
                h = layer(h, mask)
            return h
        pos = position_ids_from_mask(attention_mask)[:, -h.shape[1]:]  # (B, T): the new positions'
        # The mask is sized against this slice's first layer: the bottom's layers already hold
        # the new positions when the top runs (the unsplit model builds its mask before any
        # layer runs). transformers 5.24 renamed `past_key_values` to `cache` (the old name goes in 5.40).
        first = self.layers[0].self_attn.layer_idx if cache is not None else None
        mask = create_causal_mask(
            config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=cache, position_ids=pos,
            layer_idx=first,
        )
        assert self.rotary_emb is not None
        pe = self.rotary_emb(h, position_ids=pos)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos, cache=cache,
                      use_cache=cache is not None)
        return h


def _orthonormal_rows(k: int, d: int, seed: int) -> torch.Tensor:
    """A seeded (k, d) matrix with orthonormal rows (k <= d)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))  # (d, k)
    return q.T.contiguous().float()


class ReleaseProjection(nn.Module):
    """The client's trainable map from the cut's D-dimensional token vectors to the k it releases.

    Initialised with seeded orthonormal rows (a random k-dimensional view of the residual
    stream) and a zero bias; both train with the bottom's adapter (under DP-SGD in ``guarded``)
    and are aggregated with it, so the server knows them, as it knows every adapter.
    """

    def __init__(self, d: int, k: int, seed: int) -> None:
        super().__init__()
        if not 0 < k <= d:
            raise ModelLoadError(f"`split.release-dim` is {k} but the model's hidden size is {d}; "
                                 f"pass --set split.release-dim=K with 1 <= K <= {d}, or 0 to release all {d}")
        self.linear = nn.Linear(d, k)
        with torch.no_grad():
            self.linear.weight.copy_(_orthonormal_rows(k, d, seed))
            self.linear.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)


class Bottom(nn.Module):
    """Client side: embeddings + first ``k`` blocks (+ the release projection). (B, T) ids -> (B, T, D or k)."""

    def __init__(self, backbone: Backbone, k: int, *, release_dim: int = 0, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.kind = backbone.kind
        self.embeddings = backbone.body.embeddings if backbone.kind == "encoder" else backbone.body.embed_tokens
        self.blocks = _Blocks(backbone, list(backbone.blocks[:k]))
        cast_weights(self, dtype)  # the base weights; the release projection below is float32
        if backbone.kind == "encoder" and dtype != torch.float32:
            self.embeddings.register_forward_pre_hook(_inputs_embeds_to_weight_dtype, with_kwargs=True)
        d = backbone.hidden_size
        self.project: ReleaseProjection | None = ReleaseProjection(d, release_dim, seed) if release_dim else None
        self.release_dim = release_dim or d

    def release(self, h: torch.Tensor) -> torch.Tensor:
        """The cut's hidden states (B, T, D) -> what the client releases (B, T, release_dim), float32."""
        h = h.float()  # a no-op on float32 weights
        return self.project(h) if self.project is not None else h

    def word_embeddings(self) -> torch.Tensor:
        """The vocabulary embedding matrix (V, D), float32 (a copy when the base weights are not)."""
        emb = self.embeddings.word_embeddings if self.kind == "encoder" else self.embeddings
        return emb.weight.float()  # the attacks compare it with float32 releases

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings' output (B, T, D), float32 whatever the weights' dtype."""
        x = self.embeddings(input_ids=input_ids) if self.kind == "encoder" else self.embeddings(input_ids)
        return x.float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, release_dim); ``cache``: see :meth:`_Blocks.run` (``input_ids`` the new positions)."""
        return self.release(self.blocks.run(self.embed(input_ids), attention_mask, cache))  # (B, T, release_dim)


class Top(nn.Module):
    """Server side: blocks ``k..L`` and the task head."""

    def __init__(self, backbone: Backbone, k: int, num_labels: int, *, release_dim: int = 0,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.kind = backbone.kind
        self.blocks = _Blocks(backbone, list(backbone.blocks[k:]))
        cast_weights(self.blocks, dtype)
        d = backbone.hidden_size
        # k -> D back into the residual stream; starts as the transpose of the client's initial map
        self.expand: nn.Linear | None = nn.Linear(release_dim, d) if release_dim else None
        if self.expand is not None:
            with torch.no_grad():
                self.expand.weight.copy_(_orthonormal_rows(release_dim, d, seed).T)
                self.expand.bias.zero_()
        if backbone.kind == "encoder":
            self.head: nn.Module = nn.Linear(d, num_labels)
            self.norm: nn.Module | None = None
        else:
            assert backbone.lm_head is not None
            self.head = backbone.lm_head  # frozen (tied to the input embeddings): the base dtype
            self.norm = backbone.body.norm
            cast_weights(self.head, dtype)
            cast_weights(self.norm, dtype)

    def hidden(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.expand is not None:
            h = self.expand(h)
        h = self.blocks.run(h, attention_mask)
        return (self.norm(h) if self.norm is not None else h).float()  # (B, T, D) float32

    def next_token_logits(self, h: torch.Tensor, attention_mask: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Decoder generation: the new positions' release (B, T, k) -> the last one's next-token logits (B, V).

        The blocks run on the new positions against ``cache`` (:meth:`_Blocks.run`); the final
        norm and the LM head only at the last position. Float32.
        """
        if self.kind != "decoder" or self.norm is None:
            raise ValueError("`next_token_logits` is for decoders; an encoder's head classifies the whole row")
        if self.expand is not None:
            h = self.expand(h)
        z = self.norm(self.blocks.run(h, attention_mask, cache)[:, -1])  # (B, D)
        return self.head(z.to(weight_dtype(self.head))).float()  # (B, V)

    def logits(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder: (B, C) class logits. Decoder: (B, T, V) next-token logits. Float32."""
        z = self.hidden(h, attention_mask)
        if self.kind == "encoder":
            m = attention_mask.unsqueeze(-1).to(z.dtype)  # (B, T, 1)
            pooled = (z * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)
            return self.head(pooled)
        return self.head(z.to(weight_dtype(self.head))).float()

    def per_example_loss(
        self, h: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """(B,) loss of each example: cross-entropy, or mean response-token NLL."""
        if self.kind == "encoder":
            return F.cross_entropy(self.logits(h, attention_mask), labels, reduction="none")
        z = self.hidden(h, attention_mask)[:, :-1]  # (B, T-1, D) predicts token t+1
        target = labels[:, 1:]  # (B, T-1)
        keep = target != IGNORE
        logits = self.head(z[keep].to(weight_dtype(self.head))).float()  # (N, V): only response positions
        nll = F.cross_entropy(logits, target[keep], reduction="none")  # (N,)
        rows = keep.nonzero()[:, 0]
        per_row = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device)
        per_row.index_add_(0, rows, nll)
        counts = keep.sum(1).clamp(min=1).to(nll.dtype)
        return per_row / counts


def build_split(backbone: Backbone, layer: int, num_labels: int, *, release_dim: int = 0,
                seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Bottom, Top]:
    """Bottom and top sharing the backbone's modules (nothing is copied but the release maps).

    ``dtype``: that of the base weights (``model.dtype``); the release maps and the encoder's head are float32.
    """
    check_split_layer(layer, backbone.num_layers, backbone.name)
    return (Bottom(backbone, layer, release_dim=release_dim, seed=seed, dtype=dtype),
            Top(backbone, layer, num_labels, release_dim=release_dim, seed=seed, dtype=dtype))
