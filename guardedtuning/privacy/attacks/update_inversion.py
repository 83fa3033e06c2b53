"""Update inversion: recover a client's tokens from its bottom-LoRA update, by gradient matching.

What the curious server sees of adapter updates:

- without secure aggregation, each client's own update. For one local step of plain SGD
  the update is ``-lr`` times the gradient of the client's bottom LoRA; with DP-SGD it is
  clipped per example and noised;
- with secure aggregation, only the sum over the round's clients, and only on the
  round's public support (sparse), quantized.

In split learning the server *knows* the gradient it sent for each client's activations
(``grad_h``: it computed it), so the "labels are known" assumption of TAG/LAMP holds
exactly: the LoRA gradient of a client is ``J_theta(bottom(x))^T grad_h``, a function of
the client's tokens ``x`` alone. The attack (TAG/LAMP style) optimises relaxed one-hot
tokens for every client in the sum, so that the simulated gradient (or the sum of them)
matches the observed one in cosine distance on the observed coordinates; the scale is
left free (learning rate, DP's 1/batch and quantization change it). Sequence lengths and
masks are known to the server (it saw the activations' shapes).

Metrics: token-set F1 and ROUGE-1/2 of the recovered non-special tokens against the
victim's (:mod:`.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from guardedtuning.models.split import Bottom
from guardedtuning.privacy.attacks.common import bottom_from_vectors, eager_attention


def trainable_params(bottom: Bottom) -> list[torch.nn.Parameter]:
    return [p for p in bottom.parameters() if p.requires_grad]


def lora_gradient(bottom: Bottom, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  grad_h: torch.Tensor) -> torch.Tensor:
    """The flat gradient of the bottom's trainable tensors for ``h.backward(grad_h)`` (one client step)."""
    params = trainable_params(bottom)
    h = bottom(input_ids, attention_mask)
    grads = torch.autograd.grad((h * grad_h.to(h.dtype)).sum(), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params,
                                                                                                   strict=True)])


@dataclass
class Part:
    """One client's share of the observed sum: its mask (B, T) and the gradient the server sent (B, T, D)."""

    attention_mask: torch.Tensor
    grad_h: torch.Tensor


@dataclass
class GradientMatching:
    """Discrete gradient matching (LAMP-style) against a bottom-LoRA update or a sum of them.

    The objective is ``1 - cos(sum_i g(x_i), observed)`` on the observed coordinates,
    where ``g(x_i)`` is part i's LoRA gradient for tokens ``x_i``. Relaxed (continuous)
    tokens match the gradient of a random sentence almost as well as the true one (the
    shared ``grad_h`` dominates it), so the search is discrete: coordinate descent over
    positions, where each position's ``top_k`` candidates are proposed by the objective's
    linearisation in the word vector (HotFlip/GCG style) and then scored exactly; the best
    change is kept. ``sweeps`` passes over every position.
    """

    bottom: Bottom
    vocab: torch.Tensor  # (N,) candidate token ids
    sweeps: int = 3
    top_k: int = 8
    seed: int = 0

    def _flat_grad(self, ids: torch.Tensor, part: Part, *, create_graph: bool = False,
                   vectors: torch.Tensor | None = None) -> torch.Tensor:
        params = trainable_params(self.bottom)
        x = vectors if vectors is not None else self.bottom.word_embeddings().detach()[ids]
        h = bottom_from_vectors(self.bottom, x, part.attention_mask)
        grads = torch.autograd.grad((h * part.grad_h.to(h.dtype)).sum(), params, create_graph=create_graph,
                                    allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(q)).reshape(-1)
                          for g, q in zip(grads, params, strict=True)])

    def invert(self, observed: torch.Tensor, parts: Sequence[Part], *,
               support: torch.Tensor | None = None, fixed: dict[tuple[int, int, int], int] | None = None,
               proposals: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Token ids (B_i, T_i) for each part, whose gradients' sum best matches ``observed`` in direction.

        ``proposals`` (one (B_i, T_i, K) tensor per part, e.g. from :class:`SpanAttack`) start
        the search at their first column and replace the linearised proposals.

        ``observed`` is the flat update (any scale or sign: ``-lr * grad`` works), or only
        its ``support`` coordinates. ``fixed`` pins known tokens ``(part, row, position) ->
        id`` (e.g. [CLS] and [SEP], which every encoder row has).
        """
        if not trainable_params(self.bottom):
            raise ValueError("the bottom has no trainable tensors: load the adapter (LoRA) before the attack")
        target = observed.float().reshape(-1)
        sign_free = True  # the update is -lr * grad: compare |cos|
        fixed = fixed or {}
        gen = torch.Generator().manual_seed(self.seed)
        current = ([pr[..., 0].clone() for pr in proposals] if proposals is not None else
                   [self.vocab[torch.randint(len(self.vocab), tuple(p.attention_mask.shape), generator=gen)]
                    for p in parts])
        for (pi, r, t), tok in fixed.items():
            current[pi][r, t] = tok
        emb = self.bottom.word_embeddings().detach()
        cand_vectors = emb[self.vocab]  # (N, D)

        def select(g: torch.Tensor) -> torch.Tensor:
            return g[support] if support is not None and g.numel() != target.numel() else g

        def loss_of(total: torch.Tensor) -> torch.Tensor:
            cos = torch.nn.functional.cosine_similarity(select(total), target, dim=0)
            return 1 - (cos.abs() if sign_free else cos)

        with eager_attention(self.bottom):
            grads = [self._flat_grad(c, p).detach() for c, p in zip(current, parts, strict=True)]
            best = float(loss_of(sum(grads)))  # type: ignore[arg-type]
            for _ in range(self.sweeps):
                improved = False
                for i, part in enumerate(parts):
                    rest = sum(g for j, g in enumerate(grads) if j != i) if len(parts) > 1 else 0.0
                    rows, cols = part.attention_mask.nonzero(as_tuple=True)
                    for r, t in zip(rows.tolist(), cols.tolist(), strict=True):
                        if (i, r, t) in fixed:
                            continue
                        if proposals is not None:
                            options = proposals[i][r, t, :self.top_k].tolist()
                        else:
                            x = emb[current[i]].clone().requires_grad_(True)
                            total = self._flat_grad(current[i], part, create_graph=True, vectors=x) + rest
                            (gx,) = torch.autograd.grad(loss_of(total), [x])
                            score = -(cand_vectors @ gx[r, t])  # first-order decrease of the loss per candidate
                            options = self.vocab[score.topk(min(self.top_k, len(self.vocab))).indices].tolist()
                        for v in options:
                            if v == int(current[i][r, t]):
                                continue
                            trial = current[i].clone()
                            trial[r, t] = v
                            g = self._flat_grad(trial, part).detach()
                            value = float(loss_of(g + rest))
                            if value < best - 1e-9:
                                best, current[i], grads[i], improved = value, trial, g, True
                if not improved:
                    break
        self.final_loss = best
        return current


def first_layer_inputs(bottom: Bottom, vocab: torch.Tensor, position: int) -> torch.Tensor:
    """What the first block's LoRA-A layers read for each token of ``vocab`` (N,) at ``position``: (N, D).

    Encoders: the embedding layer's output (word + position + type, layer norm). Decoders:
    the first block's input norm of the word embedding (positions enter later, by rotation).
    """
    with torch.no_grad():
        if bottom.kind == "encoder":
            pos = torch.full((len(vocab), 1), position, dtype=torch.long)
            return bottom.embeddings(input_ids=vocab[:, None], position_ids=pos)[:, 0].float()
        layer = bottom.blocks.layers[0]
        return layer.input_layernorm(bottom.embeddings(vocab)).float()


def first_layer_rows(bottom: Bottom, observed: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of the first block's LoRA-A gradients in the observed update: (2r, D).

    ``grad A = B^T sum_t delta_t u_t^T``: every row is a combination of the first-layer
    inputs ``u_t`` of the client's tokens. Unobserved coordinates (sparse support) are 0.
    """
    names = [n for n, p in bottom.named_parameters() if p.requires_grad]
    params = trainable_params(bottom)
    full = torch.zeros(sum(p.numel() for p in params))
    flat = observed.float().reshape(-1)
    if support is not None and flat.numel() != full.numel():
        full[support] = flat
    else:
        full = flat
    rows, start = [], 0
    for name, p in zip(names, params, strict=True):
        n = p.numel()
        if "lora_A" in name and _block_index(name) == 0:
            rows.append(full[start:start + n].reshape(p.shape))
        start += n
    if not rows:
        raise ValueError("the adapter has no LoRA-A tensor in the first block; the span attack needs one")
    return torch.cat(rows)


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


@dataclass
class SpanAttack:
    """Token candidates from the span of the first block's LoRA-A gradient rows (LAMP/FILM-style prior).

    For each real position, every candidate token's first-layer input is projected on the
    row space of the observed gradient; the tokens the client used lie in it (exactly,
    when the batch has at most 2r tokens, no noise and all coordinates are seen), the
    others mostly do not. Candidates are ranked by the relative residual of the projection.
    """

    bottom: Bottom
    vocab: torch.Tensor
    rel_tol: float = 1e-3

    def candidates(self, observed: torch.Tensor, masks: Sequence[torch.Tensor], *,
                   support: torch.Tensor | None = None, k: int = 8) -> list[torch.Tensor]:
        rows = first_layer_rows(self.bottom, observed, support)  # (2r, D)
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        keep = s > self.rel_tol * s.max().clamp(min=1e-30)
        basis = vh[keep]  # (rank, D) orthonormal
        out = []
        cache: dict[int, torch.Tensor] = {}
        for mask in masks:
            b, t = mask.shape
            cand = torch.zeros((b, t, min(k, len(self.vocab))), dtype=torch.long)
            for pos in range(t):
                if pos not in cache:
                    u = first_layer_inputs(self.bottom, self.vocab, pos)  # (N, D)
                    resid = u - (u @ basis.T) @ basis
                    cache[pos] = self.vocab[(resid.norm(dim=-1) / u.norm(dim=-1).clamp(min=1e-12))
                                            .topk(cand.shape[-1], largest=False).indices]
                cand[:, pos] = cache[pos]
            out.append(cand)
        return out
