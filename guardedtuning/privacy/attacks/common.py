"""What every attack shares: the attacker's view of a released batch, and the bottom's tables.

The attacker is a curious server. It knows the bottom (white box: the base model, the
cut, the current global adapter), the mechanism's public settings, and public auxiliary
text; it sees what a client *releases* (the activations exactly as they cross the
network, dequantized as the server dequantizes them) and never the client's rows.

A :data:`Releaser` is the client's release as a function ``batch -> (B, T, D)``; build it
from the client's own code (:func:`guardedtuning.privacy.attacks.harness.make_releaser` wraps
:meth:`guardedtuning.privacy.client.ClientPrivacy.release_batch`), so the attack sees what
the client really sends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from guardedtuning.data.batches import Batch, collate
from guardedtuning.models.split import Bottom
from guardedtuning.privacy.quantize import QuantizedActivations, dequantize_activations

Releaser = Callable[[Batch], torch.Tensor]


def released_tensor(out: dict[str, Any]) -> torch.Tensor:
    """The activations a server reads from a client's release dict (dequantized if quantized)."""
    if "codes" in out:
        import numpy as np

        arrays = {k: np.asarray(out[k]) for k in ("codes", "scales", "meta")}
        return dequantize_activations(QuantizedActivations.from_arrays(arrays)).float()
    h = out["h"]
    return (h if isinstance(h, torch.Tensor) else torch.as_tensor(h)).float()


def special_ids(tokenizer: Any) -> tuple[int, ...]:
    return tuple(int(i) for i in tokenizer.all_special_ids)


@contextlib.contextmanager
def eager_attention(bottom: Bottom) -> Iterator[None]:
    """Run the bottom's attention in plain torch ops while inside (fused kernels lack double backward)."""
    config = bottom.blocks.config
    before = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def soft_embed(bottom: Bottom, word_vectors: torch.Tensor) -> torch.Tensor:
    """The bottom's embedding layer applied to (B, T, D) word vectors instead of ids.

    Encoders add positions, token types and the layer norm (``inputs_embeds``); decoders'
    embedding is the lookup itself.
    """
    if bottom.kind == "encoder":
        return bottom.embeddings(inputs_embeds=word_vectors)
    return word_vectors


def bottom_from_vectors(bottom: Bottom, word_vectors: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Released-shape activations (B, T, k) for word vectors (B, T, D): the relaxed forward of the bottom.

    It runs the bottom's own ``forward`` with its ``embed`` replaced by the soft embedding of
    ``word_vectors``, so whatever the bottom does after the blocks (e.g. a client-side
    projection to a lower release dimension) is applied too.
    """
    embedded = soft_embed(bottom, word_vectors)
    dummy = torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
    bottom.embed = lambda _ids: embedded  # type: ignore[method-assign]  # instance attribute, removed below
    try:
        return bottom(dummy, attention_mask)
    finally:
        del bottom.embed


def release_dim(bottom: Bottom) -> int:
    """The dimension of the vectors ``bottom`` outputs (its hidden size, or a lower release dimension)."""
    with torch.no_grad():
        device = bottom.word_embeddings().device
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        return int(bottom(ids, torch.ones_like(ids)).shape[-1])


@torch.no_grad()
def vocabulary_outputs(bottom: Bottom, vocab: torch.Tensor, *, context: tuple[int, int] | None = None,
                       chunk: int = 2048) -> torch.Tensor:
    """The bottom's cut output for each token of ``vocab`` (N,) run alone: (N, D).

    With ``context = (cls, sep)`` the token sits between them (``[CLS] t [SEP]``) and the
    middle position is kept, which is how an encoder usually sees a word.
    """
    rows = []
    for start in range(0, len(vocab), chunk):
        ids = vocab[start:start + chunk, None]  # (n, 1)
        if context is not None:
            n = ids.shape[0]
            ids = torch.cat([torch.full((n, 1), context[0]), ids, torch.full((n, 1), context[1])], 1)
        mask = torch.ones_like(ids)
        h = bottom(ids.to(bottom.word_embeddings().device), mask.to(bottom.word_embeddings().device))
        rows.append(h[:, 1 if context is not None else 0].float().cpu())
    return torch.cat(rows)


def aux_batches(examples: list[Any], pad_id: int, batch_size: int) -> list[Batch]:
    """Auxiliary examples (tokenised rows) in padded batches, in order."""
    return [collate(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def aux_vocabulary(batches: list[Batch], special: tuple[int, ...], *, limit: int = 0) -> torch.Tensor:
    """Token ids seen in the auxiliary batches (non-special), most frequent first; (N,)."""
    counts: dict[int, int] = {}
    for b in batches:
        for t in b.input_ids[b.attention_mask.bool()].tolist():
            if t not in special:
                counts[t] = counts.get(t, 0) + 1
    ids = sorted(counts, key=lambda t: (-counts[t], t))
    return torch.tensor(ids[:limit] if limit else ids, dtype=torch.long)
