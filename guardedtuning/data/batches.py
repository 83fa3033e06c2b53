"""Tokenised batches: classification for encoders, instruction tuning for decoders.

Encoders see the text and predict the label index. Decoders see an instruction prompt
(the tokenizer's chat template when it has one) and learn the label word as the
response; the loss covers response tokens only (prompt and padding are -100).

Batch order is a pure function of (seed, client, global step): a client can recompute
the batch of step ``s`` in the message of step ``s + 1`` without storing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from guardedtuning.models.split import IGNORE


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B,) class ids, or (B, T) token ids with -100
    class_ids: torch.Tensor  # (B,) class ids (both kinds)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.class_ids)))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def prompt_text(tokenizer: Any, instruction: str, text: str) -> str:
    user = f"{instruction}\nText: {text}"
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True))
    return f"### Instruction:\n{user}\n### Response:\n"


def encode(
    tokenizer: Any, kind: str, texts: list[str], class_ids: list[int], *,
    max_length: int, label_names: tuple[str, ...], instruction: str,
) -> Batch:
    """Tokenise one batch, right-padded to its longest row."""
    ids_t = torch.tensor(class_ids, dtype=torch.long)
    if kind == "encoder":
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return Batch(enc["input_ids"], enc["attention_mask"], ids_t, ids_t)
    eos = tokenizer.eos_token or ""
    rows, label_rows = [], []
    for text, c in zip(texts, class_ids, strict=True):
        prompt = tokenizer(prompt_text(tokenizer, instruction, text), add_special_tokens=False)["input_ids"]
        answer = tokenizer(label_names[c] + eos, add_special_tokens=False)["input_ids"]
        prompt = prompt[: max(1, max_length - len(answer))]  # keep the whole answer
        rows.append(prompt + answer)
        label_rows.append([IGNORE] * len(prompt) + answer)
    return _pad(rows, label_rows, tokenizer.pad_token_id, ids_t)


def _pad(rows: list[list[int]], label_rows: list[list[int]], pad_id: int, class_ids: torch.Tensor) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return Batch(ids, mask, labels, class_ids)


def encode_prompts(tokenizer: Any, texts: list[str], *, max_length: int, instruction: str) -> Batch:
    """Left-padded prompts for greedy generation."""
    rows = [tokenizer(prompt_text(tokenizer, instruction, t), add_special_tokens=False)["input_ids"][-max_length:]
            for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    empty = torch.zeros(len(rows), dtype=torch.long)
    return Batch(ids, mask, empty, empty)


def batch_indices(n: int, batch_size: int, step: int, *, seed: int, client: int) -> np.ndarray:
    """Row indices of global step ``step`` for a client with ``n`` rows.

    Rows are visited epoch by epoch in a seeded random order; a batch never spans two
    epochs' orders in a way that repeats a row within the batch when ``batch_size <= n``.
    """
    size = min(batch_size, n)
    start = step * size
    out = np.empty(size, dtype=np.int64)
    for j in range(size):
        pos = start + j
        epoch, offset = divmod(pos, n)
        perm = _perm(n, seed, client, epoch)
        out[j] = perm[offset]
    return out


_PERMS: dict[tuple[int, int, int, int], np.ndarray] = {}


def _perm(n: int, seed: int, client: int, epoch: int) -> np.ndarray:
    key = (n, seed, client, epoch)
    perm = _PERMS.get(key)
    if perm is None:
        if len(_PERMS) > 256:
            _PERMS.clear()
        perm = np.random.default_rng([seed, client, epoch]).permutation(n)
        _PERMS[key] = perm
    return perm


def rows_to_batch(rows: Any, idx: np.ndarray, tokenizer: Any, kind: str, *, max_length: int,
                  label_names: tuple[str, ...], instruction: str) -> Batch:
    sel = rows.select(idx.tolist())
    return encode(tokenizer, kind, list(sel["text"]), list(sel["label"]), max_length=max_length,
                  label_names=label_names, instruction=instruction)
