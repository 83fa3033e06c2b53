from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from guardedtuning.config import DataConfig
from guardedtuning.data.batches import batch_indices
from guardedtuning.data.partition import check_enough_rows, load_partition
from guardedtuning.data.sources import SENTIMENT_LABELS, load_task
from guardedtuning.data.synthetic import CONDITIONS, synthetic_rows
from guardedtuning.errors import DataError


def test_sentiment_corpus_as_a_seeded_task():
    task = load_task(DataConfig(train_size=1000, test_size=200), 0)
    assert task.label_names == SENTIMENT_LABELS
    assert len(task.train) == 1000 and len(task.test) == 200
    again = load_task(DataConfig(train_size=1000, test_size=200, alpha=0.6), 0)  # other key, same split
    assert list(task.test["text"]) == list(again.test["text"])
    other = load_task(DataConfig(train_size=1000, test_size=200), 1)
    assert list(task.test["text"]) != list(other.test["text"])
    assert 0.3 < task.majority_rate() < 0.6


def test_synthetic_rows_carry_attributes_and_are_seeded():
    rows = synthetic_rows(50, seed=3)
    assert rows == synthetic_rows(50, seed=3) and rows != synthetic_rows(50, seed=4)
    for r in rows:
        assert r["condition"] in CONDITIONS and str(r["age"]) in r["text"] and r["city"] in r["text"]
        assert r["name"] in r["text"] and r["condition"] in r["text"]
    task = load_task(DataConfig(name="synthetic", train_size=0, test_size=100), 0)
    assert {"name", "age_band", "city", "condition"} <= set(task.train.column_names)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path, suffix):
    df = pd.DataFrame({"review": [f"text {i}" for i in range(40)], "stars": ["good", "bad"] * 20})
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))
    elif suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    task = load_task(DataConfig(name=str(path), text_field="review", label_field="stars", test_size=10,
                                train_size=0), 0)
    assert task.label_names == ("bad", "good") and len(task.train) == 30


def test_missing_field_names_the_fix(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"body": ["a", "b", "c"], "label": [0, 1, 0]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, label\); pass --set data.text-field"):
        load_task(DataConfig(name=str(path), test_size=1), 0)


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="neither a known dataset nor a file"):
        load_task(DataConfig(name="no-such-thing"), 0)


def test_iid_partitions_cover_the_training_set():
    cfg = DataConfig(train_size=300, test_size=50)
    parts = [load_partition(cfg, i, 4, 0) for i in range(4)]
    assert sum(len(p) for p in parts) == 300
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_dirichlet_partitions_are_skewed_by_label():
    cfg = DataConfig(train_size=1200, test_size=50, partition="dirichlet", alpha=0.1)
    parts = [load_partition(cfg, i, 5, 0) for i in range(5)]
    shares = []
    for p in parts:
        counts = Counter(p["label"])
        shares.append(max(counts.values()) / len(p))
    iid = [load_partition(DataConfig(train_size=1200, test_size=50), i, 5, 0) for i in range(5)]
    iid_shares = [max(Counter(p["label"]).values()) / len(p) for p in iid]
    assert np.mean(shares) > np.mean(iid_shares) + 0.15


def test_more_clients_than_rows():
    with pytest.raises(DataError, match="lower --set federation.num-clients"):
        check_enough_rows(DataConfig(train_size=20, test_size=10), 50, 0)


def test_batch_order_is_a_pure_function_of_step_with_full_batches_per_epoch():
    n, b = 10, 4  # two full batches an epoch; the remaining 2 rows wait for a later order
    first = [batch_indices(n, b, s, seed=1, client=2) for s in range(6)]
    again = [batch_indices(n, b, s, seed=1, client=2) for s in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    for epoch in range(3):
        rows = np.concatenate(first[2 * epoch: 2 * epoch + 2])
        assert len(set(rows.tolist())) == 8  # no row twice within an epoch (nor a batch)
    assert set(np.concatenate(first).tolist()) == set(range(10))  # every row gets used
    other = batch_indices(n, b, 0, seed=1, client=3)
    assert not np.array_equal(first[0], other)
    assert sorted(batch_indices(3, 8, 5, seed=0, client=0).tolist()) == [0, 1, 2]  # fewer rows than a batch


def test_the_public_rows_are_disjoint_from_train_and_test_and_absent_when_none_are_left():
    from guardedtuning.config import DataConfig
    from guardedtuning.data.sources import load_task

    task = load_task(DataConfig(name="synthetic", train_size=300, test_size=100), 0)
    texts = {split: set(getattr(task, split)["text"]) for split in ("train", "test", "public")}
    assert len(task.public) == 100
    assert not texts["public"] & texts["train"] and not texts["public"] & texts["test"]
    assert load_task(DataConfig(name="synthetic", train_size=0, test_size=100), 0).public is None
