"""Tokenised batches: classification for encoders, instruction tuning for decoders.

Encoders see the text and predict the label index. Decoders see an instruction prompt
(the tokenizer's chat template when it has one) and learn the label word as the
response; the loss covers response tokens only (prompt and padding are -100).
Instruction rows (a ``response`` column, :mod:`guardedtuning.data.instruct`) are
tokenised as their own prompt and free-text response, with the same loss mask.

Batch order is a pure function of (seed, client, global step): a client can recompute
the batch of step ``s`` in the message of step ``s + 1`` without storing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from guardedtuning.data.instruct import require_decoder, tokenise_instructions
from guardedtuning.errors import DataError
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


_SLOT = "\ue000"  # a private-use character marks where the row's text goes in the template


def prompt_text(tokenizer: Any, instruction: str, text: str) -> str:
    """The instruction prompt (the tokenizer's chat template when it has one)."""
    user = f"{instruction}\nText:{text}"
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True))
    return f"### Instruction:\n{user}\n### Response:\n"


def prompt_ids(tokenizer: Any, instruction: str, texts: list[str], *, budget: int) -> list[list[int]]:
    """Token ids of each row's prompt, at most ``budget`` long, truncating the *text* only.

    The template around the text (instruction, chat markers, the assistant turn) is kept
    whole, so training and generation see the same prompt shape however long the text.
    """
    head, tail = prompt_text(tokenizer, instruction, _SLOT).split(_SLOT)
    pre = tokenizer(head, add_special_tokens=False)["input_ids"]
    suf = tokenizer(tail, add_special_tokens=False)["input_ids"]
    room = max(0, budget - len(pre) - len(suf))
    bodies = tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]
    return [pre + body[:room] + suf for body in bodies]


@dataclass(frozen=True)
class Example:
    """One tokenised row: input ids, per-token labels (decoders) and the class id."""

    ids: tuple[int, ...]
    token_labels: tuple[int, ...] | None
    class_id: int


def tokenize(
    tokenizer: Any, kind: str, texts: list[str], class_ids: list[int], *,
    max_length: int, label_names: tuple[str, ...], instruction: str,
) -> list[Example]:
    """Tokenise rows once; :func:`collate` pads any subset of them into a batch."""
    if kind == "encoder":
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        return [Example(tuple(r), None, int(c)) for r, c in zip(ids, class_ids, strict=True)]
    eos = tokenizer.eos_token or ""
    answers = {c: tokenizer(label_names[c] + eos, add_special_tokens=False)["input_ids"] for c in set(class_ids)}
    longest = max(len(a) for a in answers.values())
    prompts = prompt_ids(tokenizer, instruction, texts, budget=max_length - longest)
    out = []
    for prompt, c in zip(prompts, class_ids, strict=True):
        answer = answers[c]
        out.append(Example(tuple(prompt + answer), tuple([IGNORE] * len(prompt) + answer), int(c)))
    return out


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad examples to the longest: (B, T) ids, mask and labels."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    class_ids = torch.tensor([e.class_id for e in examples], dtype=torch.long)
    decoder = examples[0].token_labels is not None
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if decoder else class_ids
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        if e.token_labels is not None:
            labels[i, : len(e.token_labels)] = torch.tensor(e.token_labels)
    return Batch(ids, mask, labels, class_ids)


def encode(
    tokenizer: Any, kind: str, texts: list[str], class_ids: list[int], *,
    max_length: int, label_names: tuple[str, ...], instruction: str,
) -> Batch:
    """Tokenise and pad one batch."""
    return collate(tokenize(tokenizer, kind, texts, class_ids, max_length=max_length, label_names=label_names,
                            instruction=instruction), tokenizer.pad_token_id)


def encode_prompts(tokenizer: Any, texts: list[str], *, max_length: int, instruction: str) -> Batch:
    """Left-padded prompts for greedy generation."""
    return left_padded(prompt_ids(tokenizer, instruction, texts, budget=max_length), tokenizer.pad_token_id)


def left_padded(prompts: list[list[int]], pad_id: int) -> Batch:
    """Prompt ids left-padded into one batch, for generation."""
    width = max(len(r) for r in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, r in enumerate(prompts):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    empty = torch.zeros(len(prompts), dtype=torch.long)
    return Batch(ids, mask, empty, empty)


def batch_indices(n: int, batch_size: int, step: int, *, seed: int, client: int) -> np.ndarray:
    """Row indices of global step ``step`` for a client with ``n`` rows.

    Epoch by epoch, each in a fresh seeded order, ``n // batch_size`` full batches (the
    last partial batch is dropped; the next epoch's order differs, so every row is used).
    No row repeats within a batch. A client with fewer rows than a batch uses all of them.
    """
    size = min(batch_size, n)
    per_epoch = n // size
    epoch, k = divmod(step, per_epoch)
    return _perm(n, seed, client, epoch)[k * size:(k + 1) * size].copy()


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


def tokenize_rows(rows: Any, tokenizer: Any, kind: str, *, max_length: int, label_names: tuple[str, ...],
                  instruction: str) -> list[Example]:
    """Tokenise a ``datasets.Dataset`` with ``text`` and ``label`` columns (or instruction rows).

    Instruction rows (a ``response`` column) need a decoder; each becomes prompt + response
    with labels -100 on the prompt (``instruction`` and ``label_names`` are not used for them).
    A row whose prompt leaves no room for a response raises, or is left out with
    ``data.bad-rows=skip`` (:func:`~guardedtuning.data.instruct.tokenise_instructions`).
    """
    if "response" in rows.column_names:
        return instruction_examples(rows, tokenizer, kind, max_length=max_length)
    return tokenize(tokenizer, kind, list(rows["text"]), list(rows["label"]), max_length=max_length,
                    label_names=label_names, instruction=instruction)


def instruction_examples(rows: Any, tokenizer: Any, kind: str, *, max_length: int) -> list[Example]:
    """Instruction rows as examples: ids = prompt + response (+ eos), token labels -100 on the prompt."""
    require_decoder(kind)
    tok = tokenise_instructions(rows, tokenizer, max_length=max_length)
    if len(rows) and not tok.kept:
        raise DataError(f"every one of the {len(rows)} instruction rows has a prompt too long for "
                        f"model.max-length={max_length} (data.bad-rows=skip left none); raise model.max-length")
    labels = rows["label"]
    return [Example(tuple(p + r), tuple([IGNORE] * len(p) + r), int(labels[k]))
            for p, r, k in zip(tok.prompts, tok.responses, tok.kept, strict=True)]
