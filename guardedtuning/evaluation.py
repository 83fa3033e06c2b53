"""Central utility on the held-out split, on the model assembled as it is used.

Encoders: accuracy. Decoders: greedy generation, then exact match of the response
with the reference (the label word, or an instruction row's response; after stripping,
lower-casing and dropping a final full stop) and ROUGE-L F1 from the ``rouge-score``
package (``rougeL`` with its default tokenizer and the Porter stemmer, as published
instruction-tuning evaluations use it; that tokenizer keeps ASCII letters and digits only);
the utility of a decoder run is its exact match.

Instruction rows are prompted as they were trained (chat template or the plain one,
:mod:`guardedtuning.data.instruct`); generation stops at eos or after
``max(eval.max-new-tokens, the longest test response's token count)`` tokens, so a reference
always fits. Rows whose prompt leaves no room in ``model.max-length`` are skipped under
``data.bad-rows=skip`` (``eval_rows`` says how many were scored), else raise.

Generation is incremental (:func:`greedy_token_ids`): the prompt runs once, then one token per
step against a key/value cache that bottom and top share, with the LM head at the last position
only; it gives the uncached path's tokens and the unsplit model's ``generate`` (tested).

No wasted compute: everything runs under ``torch.inference_mode`` (nothing here needs
autograd), and the test rows go through the model sorted by length (``sort_by_length``), so
each batch is padded to its own longest row only; the metrics are sums over rows, and each
row's output does not depend on the rows it is batched with (attention stays within a row),
so the sorted order gives the unsorted figures up to float rounding (tested).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from guardedtuning.data.batches import Batch, collate, encode_prompts, left_padded, prompt_ids, tokenize
from guardedtuning.data.instruct import tokenise_instructions
from guardedtuning.data.sources import TaskData
from guardedtuning.errors import DataError
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


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (``rouge-score``'s ``rougeL``, stemmed)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().strip(".!").split())


@torch.inference_mode()
def greedy_generate(model: SplitModel, tokenizer: Any, texts: list[str], *, instruction: str,
                    max_length: int, max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy decoding through bottom and top (incremental: see :func:`greedy_token_ids`)."""
    batch = encode_prompts(tokenizer, texts, max_length=max_length, instruction=instruction)
    return _greedy(model, tokenizer, batch.to(device), max_new_tokens=max_new_tokens, device=device)


@torch.inference_mode()
def greedy_token_ids(model: Any, batch: Batch, *, eos: int, pad: int, max_new_tokens: int,
                     use_cache: bool = True) -> torch.Tensor:
    """Greedy continuations of the left-padded prompts in ``batch``: (B, N) new token ids, N <= ``max_new_tokens``.

    A row that has emitted ``eos`` continues with ``pad`` (masked out); decoding stops when
    every row has. With ``use_cache`` (and a model that has ``next_token_logits``, as
    :class:`SplitModel` does) the prompt runs once through bottom and top, filling one
    key/value cache the two parts share, and each later step runs only the new token, with
    the LM head at the last position only: the unsplit model's ``generate`` semantics
    (tested equal to it, and to the uncached path). Otherwise (``use_cache=False``, or a
    model with ``logits`` only, such as the offsite sandwich) every step re-runs the whole
    sequence and takes the last position's logits.
    """
    ids, mask = batch.input_ids, batch.attention_mask  # (B, T0), left-padded
    cached = use_cache and hasattr(model, "next_token_logits")
    cache = model.new_cache() if cached else None
    step = ids  # what the next forward runs: the prompt, then one token at a time
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits = model.next_token_logits(step, mask, cache) if cached else model.logits(ids, mask)[:, -1]  # (B, V)
        nxt = logits.argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done | (nxt == eos)).long()[:, None]], 1)
        step = nxt[:, None]
        if bool(done.all()):
            break
    return torch.stack(new, 1) if new else ids.new_zeros((ids.shape[0], 0))


@torch.inference_mode()
def _greedy(model: SplitModel, tokenizer: Any, batch: Batch, *, max_new_tokens: int,
            device: torch.device) -> list[str]:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = greedy_token_ids(model, batch.to(device), eos=eos, pad=pad, max_new_tokens=max_new_tokens).tolist()
    return [tokenizer.decode([t for t in row if t not in (eos, pad)], skip_special_tokens=True) for row in out]


def length_order(lengths: list[int], batch_size: int, *, sort: bool = True) -> list[list[int]]:
    """Row indices in batches of ``batch_size``: sorted by length (shortest first) when ``sort``, else in order."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if sort else list(range(len(lengths)))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def _generate_all(model: SplitModel, tokenizer: Any, prompts: list[list[int]], *, batch_size: int,
                  max_new_tokens: int, device: torch.device, sort: bool) -> list[str]:
    """Greedy responses to every prompt, in the prompts' order, batched by prompt length when ``sort``."""
    preds: list[str] = [""] * len(prompts)
    for idx in length_order([len(p) for p in prompts], batch_size, sort=sort):
        batch = left_padded([prompts[k] for k in idx], tokenizer.pad_token_id)
        for k, pred in zip(idx, _greedy(model, tokenizer, batch.to(device), max_new_tokens=max_new_tokens,
                                        device=device), strict=True):
            preds[k] = pred
    return preds


@torch.inference_mode()
def evaluate(model: SplitModel, tokenizer: Any, task: TaskData, *, max_length: int, batch_size: int,
             max_new_tokens: int, device: torch.device, sort_by_length: bool = True) -> dict[str, float]:
    """Utility metrics on ``task.test``; ``"utility"`` is the headline number.

    ``sort_by_length`` batches the rows by length (no padding computed that a result does
    not need); False batches them in the split's order, padded to each batch's longest.
    """
    model.eval()
    if task.format == "instruction":
        return _evaluate_instructions(model, tokenizer, task, max_length=max_length, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, device=device, sort=sort_by_length)
    test = task.test
    n = len(test)
    labels = list(test["label"])
    if model.kind == "encoder":
        examples = tokenize(tokenizer, "encoder", list(test["text"]), labels, max_length=max_length,
                            label_names=task.label_names, instruction=task.instruction)
        correct, loss_sum = 0, 0.0
        for idx in length_order([len(e.ids) for e in examples], batch_size, sort=sort_by_length):
            b = collate([examples[k] for k in idx], tokenizer.pad_token_id).to(device)
            logits = model.logits(b.input_ids, b.attention_mask)
            correct += int((logits.argmax(-1) == b.labels).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, b.labels, reduction="sum"))
        return {"utility": correct / n, "accuracy": correct / n, "test_loss": loss_sum / n}
    prompts = prompt_ids(tokenizer, task.instruction, list(test["text"]), budget=max_length)
    preds = _generate_all(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          device=device, sort=sort_by_length)
    exact, rouge = 0.0, 0.0
    for pred, label in zip(preds, labels, strict=True):
        ref = task.label_names[label]
        exact += float(normalize(pred) == normalize(ref))
        rouge += rouge_l(pred, ref)
    return {"utility": exact / n, "exact_match": exact / n, "rouge_l": rouge / n}


def _evaluate_instructions(model: SplitModel, tokenizer: Any, task: TaskData, *, max_length: int, batch_size: int,
                           max_new_tokens: int, device: torch.device, sort: bool = True) -> dict[str, float]:
    """Exact match and ROUGE-L of greedy responses to the test rows' prompts."""
    tok = tokenise_instructions(task.test, tokenizer, max_length=max_length)
    if not tok.kept:
        raise DataError(f"no test row of {task.source} has a prompt that fits model.max-length={max_length} "
                        "(data.bad-rows=skip left none); raise model.max-length")
    responses = task.test["response"]
    refs = [responses[k] for k in tok.kept]
    budget = max(max_new_tokens, max(len(r) for r in tok.responses))
    preds = _generate_all(model, tokenizer, tok.prompts, batch_size=batch_size, max_new_tokens=budget,
                          device=device, sort=sort)
    exact, rouge = 0.0, 0.0
    for pred, ref in zip(preds, refs, strict=True):
        exact += float(normalize(pred) == normalize(ref))
        rouge += rouge_l(pred, ref)
    n = len(refs)
    return {"utility": exact / n, "exact_match": exact / n, "rouge_l": rouge / n, "eval_rows": float(n)}


def utility_metric(kind: str) -> str:
    return "accuracy" if kind == "encoder" else "exact_match"
