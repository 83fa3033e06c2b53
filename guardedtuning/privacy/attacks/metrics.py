"""Attack metrics, on token ids: top-1/top-5 recovery, ROUGE-L/1/2, token-set F1, accuracy.

Every metric counts *non-special* tokens only ([CLS], [SEP], padding and the other
special ids never count): recovering them is free and says nothing about the text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from guardedtuning.evaluation import lcs_length


def content_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      special_ids: Iterable[int]) -> torch.Tensor:
    """(B, T) bool: real (unpadded) positions that hold a non-special token."""
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=input_ids.dtype)
    keep = attention_mask.bool()
    if special.numel():
        keep &= ~torch.isin(input_ids, special.to(input_ids.device))
    return keep


def topk_recovery(candidates: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  special_ids: Iterable[int], *, k: int = 1) -> float:
    """Fraction of non-special positions whose true token is among the first ``k`` candidates.

    ``candidates`` (B, T, K) holds each position's guesses, best first (K >= k).
    """
    if candidates.shape[:2] != input_ids.shape:
        raise ValueError(f"candidates have shape {tuple(candidates.shape)}, expected ({input_ids.shape[0]}, "
                         f"{input_ids.shape[1]}, K)")
    if candidates.shape[2] < k:
        raise ValueError(f"top-{k} recovery needs >= {k} candidates per position, got {candidates.shape[2]}")
    keep = content_positions(input_ids, attention_mask, special_ids)
    if not bool(keep.any()):
        return float("nan")
    hit = (candidates[..., :k] == input_ids.unsqueeze(-1)).any(-1)  # (B, T)
    return float(hit[keep].float().mean())


def content_tokens(ids: Sequence[int], mask: Sequence[int] | None, special_ids: Iterable[int]) -> list[int]:
    special = set(int(i) for i in special_ids)
    return [int(t) for i, t in enumerate(ids) if (mask is None or mask[i]) and int(t) not in special]


def rouge_l_tokens(prediction: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 of two token sequences."""
    lcs = lcs_length([str(t) for t in prediction], [str(t) for t in reference])
    if lcs == 0:
        return 0.0
    p, r = lcs / len(prediction), lcs / len(reference)
    return 2 * p * r / (p + r)


def _ngrams(seq: Sequence[int], n: int) -> Counter[tuple[int, ...]]:
    return Counter(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))


def rouge_n(prediction: Sequence[int], reference: Sequence[int], n: int) -> float:
    """ROUGE-N F1 (clipped n-gram overlap) of two token sequences."""
    p, r = _ngrams(prediction, n), _ngrams(reference, n)
    overlap = sum((p & r).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def token_set_f1(prediction: Iterable[int], reference: Iterable[int]) -> float:
    """F1 of the *sets* of tokens (order and repeats ignored), as in TAG/LAMP's token recovery."""
    p, r = set(prediction), set(reference)
    if not p or not r:
        return 0.0
    hit = len(p & r)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(p), hit / len(r)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(predicted: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 special_ids: Iterable[int]) -> float:
    """Mean ROUGE-L over rows between the recovered and the true non-special token sequences."""
    special = list(special_ids)
    scores = []
    for pred, ref, mask in zip(predicted.tolist(), input_ids.tolist(), attention_mask.tolist(), strict=True):
        keep = [bool(m) and t not in set(special) for t, m in zip(ref, mask, strict=True)]
        r = [t for t, k in zip(ref, keep, strict=True) if k]
        p = [t for t, k in zip(pred, keep, strict=True) if k]  # the same positions, recovered
        if r:
            scores.append(rouge_l_tokens(p, r))
    return sum(scores) / len(scores) if scores else float("nan")


def token_report(candidates: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 special_ids: Iterable[int]) -> dict[str, float]:
    """The EIA figures: ``asr`` (top-1 over non-special tokens), ``top5``, ``rouge_l``."""
    special = list(special_ids)
    return {
        "asr": topk_recovery(candidates, input_ids, attention_mask, special, k=1),
        "top5": topk_recovery(candidates, input_ids, attention_mask, special, k=min(5, candidates.shape[2]))
        if candidates.shape[2] >= 5 else float("nan"),
        "rouge_l": mean_rouge_l(candidates[..., 0], input_ids, attention_mask, special),
    }


def majority_rate(labels: Sequence[int]) -> float:
    """Share of the most common label: what always guessing it scores."""
    if not labels:
        return float("nan")
    return max(Counter(labels).values()) / len(labels)
