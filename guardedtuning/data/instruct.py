"""Instruction/response rows: reading them, checking them, and tokenising them for a decoder.

Two row shapes are read (from local files and hub datasets alike):

- **Alpaca-style**: ``instruction``, an optional ``input`` and ``output`` (the column names
  are ``data.instruction-field``, ``data.input-field`` and ``data.response-field``);
- **chat**: ``messages``, a list of ``{"role", "content"}`` turns (``data.messages-field``;
  a JSON string in a CSV cell is parsed). The *last* turn must be the assistant's: it is the
  response; every earlier turn (system, user, and earlier assistant turns) is the prompt.

Every row becomes the same columns: ``messages`` (the prompt turns, as a JSON string),
``response`` (str), ``text`` (the prompt turns' content joined by blank lines: what the
client's bottom sees of the row, read by the attacks), ``label`` (an int: the embedded task's
request kind, else 0), ``row`` (the row's 0-based index in its source) and any extra columns.

Formatting (:func:`render_prompt`): the tokenizer's chat template with the generation prompt
when it has one (``template = "chat"``), else the plain template below (``"plain"``)::

    ### System:\\n{content}\\n       (a system turn)
    ### Instruction:\\n{content}\\n  (a user turn)
    ### Response:\\n{content}\\n     (an earlier assistant turn)
    ### Response:\\n                (where the response starts)

The response is ``response + eos``; the loss covers its tokens only (prompt and padding are
``-100``). A response that does not fit in ``model.max-length`` after its prompt is cut at the
end (counted as truncated); a prompt that leaves no room for one response token is a bad row.

Bad rows (a missing field, an empty response, a prompt too long) raise a one-line
:class:`~guardedtuning.errors.DataError` naming the source, the row, the field and the fix;
with ``data.bad-rows=skip`` they are dropped instead and counted
(:func:`guardedtuning.data.sources.data_record` puts the counts in the run's record).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from guardedtuning.config import DataConfig
from guardedtuning.errors import DataError

ROLES = ("system", "user", "assistant")
MISSING, EMPTY, TOO_LONG = "missing field", "empty response", "prompt too long"
_PLAIN_HEADS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
PLAIN_RESPONSE = "### Response:\n"


def detect_format(cfg: DataConfig, columns: list[str]) -> str:
    """``"chat"``, ``"alpaca"`` or ``"label"`` (classification) for a source with ``columns``.

    ``data.format=auto`` picks chat when the messages column is there, else Alpaca when the
    instruction and response columns are, else classification (text and label columns).
    """
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in columns:
        return "chat"
    if cfg.instruction_field in columns and cfg.response_field in columns:
        return "alpaca"
    return "label"


def _bad(what: str, index: int, field: str, problem: str) -> DataError:
    return DataError(f"{what} row {index} (0-based): {problem} in field {field!r}; fix the row or pass "
                     "--set data.bad-rows=skip to skip such rows (counted in the record)")


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN from pandas
    except (TypeError, ValueError):
        return False


def _turns(value: Any) -> list[dict[str, str]] | None:
    """A messages cell as a list of ``{"role", "content"}`` dicts, or None if it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    out = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            return None
        out.append({"role": str(turn["role"]), "content": str(turn["content"])})
    return out


def instruction_records(df: Any, cfg: DataConfig, what: str, fmt: str, *,
                        keep_label: bool = False) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of a pandas frame in ``fmt`` (``alpaca`` or ``chat``) as normalised records, and skip counts.

    ``keep_label``: the frame's integer ``label`` column is the rows' class (the embedded
    task's request kind); otherwise every row's ``label`` is 0.

    Raises :class:`DataError` on the first bad row unless ``data.bad-rows=skip``.
    """
    cols = list(df.columns)
    needed = (("data.messages-field", cfg.messages_field),) if fmt == "chat" else (
        ("data.instruction-field", cfg.instruction_field), ("data.response-field", cfg.response_field))
    for key, col in needed:
        if col not in cols:
            raise DataError(f"{what} has no column {col!r} (columns: {', '.join(map(str, cols))}); "
                            f"pass --set {key}=<column> (or data.format=label for classification rows)")
    used = {cfg.messages_field} if fmt == "chat" else {cfg.instruction_field, cfg.input_field, cfg.response_field}
    extra = [c for c in cols if c not in used | {"text", "label", "response", "messages", "row"}]
    has_label = keep_label and "label" in cols
    skipped = {MISSING: 0, EMPTY: 0}
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(df.to_dict("records")):
        problem = _check(rec, cfg, fmt)
        if problem is not None:
            field, reason, kind = problem
            if cfg.bad_rows != "skip":
                raise _bad(what, i, field, reason)
            skipped[kind] += 1
            continue
        if fmt == "chat":
            turns = _turns(rec[cfg.messages_field]) or []
            prompt, response = turns[:-1], turns[-1]["content"]
        else:
            user = str(rec[cfg.instruction_field]).strip()
            extra_input = rec.get(cfg.input_field)
            if not _missing(extra_input) and str(extra_input).strip():
                user = f"{user}\n\n{str(extra_input).strip()}"
            prompt, response = [{"role": "user", "content": user}], str(rec[cfg.response_field])
        row = {"text": "\n\n".join(t["content"] for t in prompt), "label": 0, "response": response,
               "messages": json.dumps(prompt), "row": i}
        if has_label:
            row["label"] = int(rec["label"])
        row.update({c: rec[c] for c in extra})
        rows.append(row)
    return rows, skipped


def _check(rec: dict[str, Any], cfg: DataConfig, fmt: str) -> tuple[str, str, str] | None:
    """(field, problem, kind) of a bad row, or None."""
    if fmt == "chat":
        field = cfg.messages_field
        turns = _turns(rec.get(field))
        if turns is None:
            return field, "no list of {role, content} turns (roles: system, user, assistant)", MISSING
        if len(turns) < 2 or turns[-1]["role"] != "assistant" or all(t["role"] != "user" for t in turns):
            return field, "no user turn followed by a final assistant turn (the response)", MISSING
        if not turns[-1]["content"].strip():
            return field, "an empty final assistant turn (the response)", EMPTY
        return None
    for field in (cfg.instruction_field, cfg.response_field):
        if _missing(rec.get(field)):
            return field, "a missing value", MISSING
    if not str(rec[cfg.instruction_field]).strip():
        return cfg.instruction_field, "an empty instruction", MISSING
    if not str(rec[cfg.response_field]).strip():
        return cfg.response_field, "an empty response", EMPTY
    return None


def require_decoder(kind: str) -> None:
    """Instruction rows train a decoder: the error for any other kind of model."""
    if kind != "decoder":
        raise DataError("instruction rows (a free-text response per row) train a decoder, but the model is an "
                        f"{kind}; pass a decoder (--set model.name=smollm2-135m) or classification rows "
                        "(--set data.format=label with data.text-field and data.label-field)")


def template_kind(tokenizer: Any) -> str:
    """``"chat"`` when the tokenizer has a chat template (used), else ``"plain"`` (the fallback)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def render_prompt(tokenizer: Any, turns: list[dict[str, str]]) -> str:
    """The prompt text up to where the response starts (the chat template, or the plain one)."""
    if template_kind(tokenizer) == "chat":
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
    return "".join(f"{_PLAIN_HEADS[t['role']]}{t['content']}\n" for t in turns) + PLAIN_RESPONSE


@dataclass(frozen=True)
class Meta:
    """What tokenising a set of instruction rows needs beyond the rows: where they came from, the policy."""

    source: str = "instruction rows"
    bad_rows: str = "error"

    def describe(self) -> str:
        return json.dumps({"guardedtuning": {"source": self.source, "bad_rows": self.bad_rows}})

    @classmethod
    def of(cls, rows: Any) -> Meta:
        """The metadata a ``datasets.Dataset`` of instruction rows carries (in ``info.description``)."""
        try:
            data = json.loads(rows.info.description or "{}").get("guardedtuning", {})
        except (json.JSONDecodeError, AttributeError):
            data = {}
        return cls(**data) if data else cls()


@dataclass(frozen=True)
class Tokenised:
    """Instruction rows tokenised for a decoder, with what was dropped or cut."""

    prompts: list[list[int]]  # prompt ids of each kept row
    responses: list[list[int]]  # response ids (+ eos, cut to fit) of each kept row
    kept: list[int]  # positions (in the rows given) of the kept rows
    too_long: int  # rows dropped: the prompt leaves no room for a response token
    truncated: int  # kept rows whose response was cut at model.max-length


def tokenise_instructions(rows: Any, tokenizer: Any, *, max_length: int) -> Tokenised:
    """Prompt and response ids of ``rows`` (a ``datasets.Dataset`` with ``messages`` and ``response``)."""
    meta = Meta.of(rows)
    texts = [render_prompt(tokenizer, json.loads(m)) for m in rows["messages"]]
    eos = tokenizer.eos_token or ""
    # verbose=False: a prompt longer than the tokenizer's own limit is this function's to report (one line)
    prompt_ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    response_ids = tokenizer([r + eos for r in rows["response"]], add_special_tokens=False, verbose=False)["input_ids"]
    index = rows["row"] if "row" in rows.column_names else list(range(len(rows)))
    prompts, responses, kept, too_long, truncated = [], [], [], 0, 0
    for k, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if len(p) + 1 > max_length:
            if meta.bad_rows != "skip":
                raise DataError(
                    f"{meta.source} row {index[k]} (0-based): the prompt (field 'messages', as formatted) is "
                    f"{len(p)} tokens, leaving no room for a response in model.max-length={max_length}; pass "
                    f"--set model.max-length={len(p) + 16} or more, shorten the prompt, or --set data.bad-rows=skip"
                )
            too_long += 1
            continue
        room = max_length - len(p)
        truncated += len(r) > room
        prompts.append(list(p))
        responses.append(list(r[:room]))
        kept.append(k)
    return Tokenised(prompts, responses, kept, too_long, truncated)
