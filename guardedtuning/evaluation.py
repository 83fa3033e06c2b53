"""Central utility on the held-out split, on the model assembled as it is used.

Encoders: accuracy. Decoders: greedy generation, then exact match of the response
with the label word (after stripping and lower-casing) and ROUGE-L F1; the utility of
a decoder run is its exact match.
"""

from __future__ import annotations

from typing import Any

import torch

from guardedtuning.data.batches import encode, encode_prompts
from guardedtuning.data.sources import TaskData
from guardedtuning.models.parts import SplitModel


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens."""
    p, r = prediction.lower().split(), reference.lower().split()
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().strip(".!").split())


@torch.no_grad()
def greedy_generate(model: SplitModel, tokenizer: Any, texts: list[str], *, instruction: str,
                    max_length: int, max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy decoding through bottom and top (no KV cache: answers are a few tokens)."""
    batch = encode_prompts(tokenizer, texts, max_length=max_length, instruction=instruction).to(device)
    ids, mask = batch.input_ids, batch.attention_mask
    eos = tokenizer.eos_token_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        nxt = model.logits(ids, mask)[:, -1].argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
        new.append(nxt)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done | (nxt == eos)).long()[:, None]], 1)
        if bool(done.all()):
            break
    out = torch.stack(new, 1).tolist()
    return [tokenizer.decode([t for t in row if t not in (eos, tokenizer.pad_token_id)],
                             skip_special_tokens=True) for row in out]


@torch.no_grad()
def evaluate(model: SplitModel, tokenizer: Any, task: TaskData, *, max_length: int, batch_size: int,
             max_new_tokens: int, device: torch.device) -> dict[str, float]:
    """Utility metrics on ``task.test``; ``"utility"`` is the headline number."""
    model.eval()
    test = task.test
    n = len(test)
    if model.kind == "encoder":
        correct, loss_sum = 0, 0.0
        for start in range(0, n, batch_size):
            rows = test.select(range(start, min(n, start + batch_size)))
            b = encode(tokenizer, "encoder", list(rows["text"]), list(rows["label"]), max_length=max_length,
                       label_names=task.label_names, instruction=task.instruction).to(device)
            logits = model.logits(b.input_ids, b.attention_mask)
            correct += int((logits.argmax(-1) == b.labels).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, b.labels, reduction="sum"))
        return {"utility": correct / n, "accuracy": correct / n, "test_loss": loss_sum / n}
    exact, rouge = 0.0, 0.0
    for start in range(0, n, batch_size):
        rows = test.select(range(start, min(n, start + batch_size)))
        preds = greedy_generate(model, tokenizer, list(rows["text"]), instruction=task.instruction,
                                max_length=max_length, max_new_tokens=max_new_tokens, device=device)
        for pred, label in zip(preds, rows["label"], strict=True):
            ref = task.label_names[label]
            exact += float(normalize(pred) == normalize(ref))
            rouge += rouge_l(pred, ref)
    return {"utility": exact / n, "exact_match": exact / n, "rouge_l": rouge / n}


def utility_metric(kind: str) -> str:
    return "accuracy" if kind == "encoder" else "exact_match"
