"""Instruction/response rows (Alpaca-style and chat): sources, the loss mask, bad rows, hub data, ROUGE-L."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from guardedtuning.config import DataConfig, build_config
from guardedtuning.data.batches import collate, tokenize_rows
from guardedtuning.data.instruct import PLAIN_RESPONSE, Meta, render_prompt
from guardedtuning.data.partition import load_partition
from guardedtuning.data.sources import data_record, load_task
from guardedtuning.data.synthetic import CONDITIONS, LABELS, synthetic_instruction_rows, synthetic_rows
from guardedtuning.errors import DataError
from guardedtuning.evaluation import rouge_l
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.split import IGNORE

ALPACA = [{"instruction": f"Name the colour number {i}.", "input": "" if i % 2 else f"context {i}",
           "output": f"The colour is number {i}.", "category": ["a", "b", "c"][i % 3]} for i in range(40)]


def _chat(i):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count to {i}."},
            {"role": "assistant", "content": f"Up to {i}."}]


def _write(rows, path):
    df = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif path.suffix == ".csv":
        if "messages" in df:
            df["messages"] = df["messages"].map(json.dumps)
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_alpaca_and_chat_rows_from_local_files(tmp_path, suffix):
    name = _write(ALPACA, tmp_path / f"alpaca{suffix}")
    task = load_task(DataConfig(name=name, train_size=0, test_size=10), 0)
    assert task.format == "instruction" and len(task.train) == 30
    by_row = {r["row"]: r for r in task.train} | {r["row"]: r for r in task.test}
    for i in (0, 1):  # row 0 has an input, row 1 an empty one (no blank-line suffix)
        src = ALPACA[i]
        want = src["instruction"] + (f"\n\n{src['input']}" if src["input"] else "")
        assert json.loads(by_row[i]["messages"]) == [{"role": "user", "content": want}]
        assert by_row[i]["response"] == src["output"] and by_row[i]["text"] == want
    assert by_row[0]["category"] == "a"  # extra columns are kept

    name = _write([{"messages": _chat(i)} for i in range(20)], tmp_path / f"chat{suffix}")
    chat = load_task(DataConfig(name=name, train_size=0, test_size=5), 0)
    row = next(r for r in chat.train if r["row"] == 3)
    assert json.loads(row["messages"]) == _chat(3)[:-1] and row["response"] == "Up to 3."


def test_alpaca_input_column_is_optional(tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(12)]
    task = load_task(DataConfig(name=_write(rows, tmp_path / "d.jsonl"), train_size=0, test_size=2), 0)
    assert set(task.train["text"]) | set(task.test["text"]) == {f"Say {i}." for i in range(12)}


@pytest.mark.parametrize("shape", ["alpaca", "chat"])
@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m"])  # plain template; SmolLM2's chat template
def test_the_loss_covers_exactly_the_response_tokens(tmp_path, model, shape):
    tok = load_tokenizer(model)
    rows = ALPACA if shape == "alpaca" else [{"messages": _chat(i)} for i in range(40)]
    task = load_task(DataConfig(name=_write(rows, tmp_path / "a.jsonl"), train_size=0, test_size=10), 0)
    rows = task.train.select(range(6))
    batch = collate(tokenize_rows(rows, tok, "decoder", max_length=64, label_names=task.label_names,
                                  instruction=task.instruction), tok.pad_token_id)
    for i, r in enumerate(rows):
        turns = json.loads(r["messages"])
        prompt = tok(render_prompt(tok, turns), add_special_tokens=False)["input_ids"]
        response = tok(r["response"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        n = int(batch.attention_mask[i].sum())
        assert n == len(prompt) + len(response)
        assert batch.input_ids[i, :n].tolist() == prompt + response
        scored = (batch.labels[i] != IGNORE).nonzero().flatten().tolist()
        assert scored == list(range(len(prompt), n))  # the response's positions, nothing of prompt or padding
        assert batch.labels[i, scored].tolist() == response
    if model == "smollm2-135m":  # the model's own chat template, ending in the assistant turn
        assert render_prompt(tok, turns).endswith("<|im_start|>assistant\n")
    elif shape == "alpaca":  # the documented fallback
        assert render_prompt(tok, turns) == f"### Instruction:\n{turns[0]['content']}\n{PLAIN_RESPONSE}"
    else:
        assert render_prompt(tok, turns) == (f"### System:\nBe brief.\n### Instruction:\n{turns[1]['content']}\n"
                                             f"{PLAIN_RESPONSE}")


def test_an_encoder_refuses_instruction_rows(tmp_path):
    task = load_task(DataConfig(name=_write(ALPACA, tmp_path / "a.jsonl"), train_size=0, test_size=10), 0)
    with pytest.raises(DataError, match="train a decoder, but the model is an encoder"):
        tokenize_rows(task.train, load_tokenizer("tiny-bert"), "encoder", max_length=32, label_names=("x",),
                      instruction="")


def test_a_classification_file_with_a_response_column_stays_classification(tmp_path):
    """Regression (review): a label CSV with an extra `response` column was tokenised as instruction rows."""
    rows = [{"text": f"row {i} is fine", "label": ["neg", "pos"][i % 2], "response": f"free text {i}"}
            for i in range(20)]
    task = load_task(DataConfig(name=_write(rows, tmp_path / "labels.csv"), train_size=10, test_size=10), 0)
    assert task.format == "label" and "response" not in task.train.column_names
    examples = tokenize_rows(task.train, load_tokenizer("tiny-bert"), "encoder", max_length=32,
                             label_names=task.label_names, instruction="")
    assert len(examples) == len(task.train) and {e.class_id for e in examples} == {0, 1}


@pytest.mark.parametrize(("change", "field", "problem"), [
    ({"output": None}, "output", "a missing value"),
    ({"output": "   "}, "output", "an empty response"),
    ({"instruction": ""}, "instruction", "an empty instruction"),
])
def test_a_bad_alpaca_row_is_one_line_naming_file_row_field_and_fix(tmp_path, change, field, problem):
    rows = [dict(r) for r in ALPACA]
    rows[7].update(change)
    name = _write(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError) as err:
        load_task(DataConfig(name=name, train_size=0, test_size=5), 0)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "row 7 (0-based)" in msg and f"field {field!r}" in msg
    assert problem in msg and "--set data.bad-rows=skip" in msg
    skipped = load_task(DataConfig(name=name, train_size=0, test_size=5, bad_rows="skip"), 0)
    assert len(skipped.train) + len(skipped.test) == 39 and 7 not in set(skipped.train["row"])
    assert sum(skipped.skipped.values()) == 1


def test_a_bad_chat_row_names_the_messages_field(tmp_path):
    rows = [{"messages": _chat(i)} for i in range(10)]
    rows[4]["messages"] = _chat(4)[:-1]  # no final assistant turn
    with pytest.raises(DataError, match=r"row 4 \(0-based\): no user turn followed by a final assistant turn"):
        load_task(DataConfig(name=_write(rows, tmp_path / "c.jsonl"), train_size=0, test_size=2), 0)


def test_a_prompt_too_long_errors_or_is_skipped_and_counted_in_the_record(tmp_path):
    rows = [dict(r) for r in ALPACA]
    rows[5]["instruction"] = "word " * 200
    name = _write(rows, tmp_path / "long.jsonl")
    cfg = DataConfig(name=name, train_size=0, test_size=5)
    with pytest.raises(DataError) as err:
        data_record(cfg, model="tiny-llama", max_length=48, seed=0)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "row 5 (0-based)" in msg and "'messages'" in msg
    assert "--set model.max-length=" in msg and "data.bad-rows=skip" in msg
    skip = DataConfig(name=name, train_size=0, test_size=5, bad_rows="skip")
    record = data_record(skip, model="tiny-llama", max_length=48, seed=0)
    assert sum(record["skipped_prompt_too_long"].values()) == 1 and record["template"] == "plain"
    task = load_task(skip, 0)
    examples = [tokenize_rows(s, load_tokenizer("tiny-llama"), "decoder", max_length=48, label_names=("r",),
                              instruction="") for s in (task.train, task.test)]
    assert sum(len(e) for e in examples) == 39  # the long row is left out, not cut


def _hub_folder(tmp_path):
    """A local dataset folder that ``datasets.load_dataset`` reads like a hub dataset (splits by file name)."""
    folder = tmp_path / "hubdata"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = [{"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}.",
             "category": str(rng.choice(["open_qa", "summarization", "brainstorming", "classification"]))}
            for i in range(400)]
    pd.DataFrame(rows[:300]).to_parquet(folder / "train.parquet")
    pd.DataFrame(rows[300:]).to_parquet(folder / "validation.parquet")
    return str(folder)


def test_hub_datasets_go_through_federated_dataset_any_split_iid_and_dirichlet(tmp_path, monkeypatch):
    import flwr_datasets

    made = []
    real = flwr_datasets.FederatedDataset

    class Spy(real):  # records that (and how) FederatedDataset is used
        def __init__(self, **kw):
            made.append(kw)
            super().__init__(**kw)

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", Spy)
    folder = _hub_folder(tmp_path)
    val = load_task(DataConfig(name=f"hub:{folder}", split="validation", train_size=0, test_size=20), 0)
    assert len(val.train) == 80 and set(val.test["response"]) <= {f"Answer {i}." for i in range(300, 400)}
    cfg = DataConfig(name=f"hub:{folder}", train_size=0, test_size=20)
    iid = [load_partition(cfg, i, 4, 0) for i in range(4)]
    assert sum(len(p) for p in iid) == 280 and max(len(p) for p in iid) - min(len(p) for p in iid) <= 1
    train_rows = set(load_task(cfg, 0).train["row"])
    assert set().union(*(set(p["row"]) for p in iid)) == train_rows
    skew = DataConfig(name=f"hub:{folder}", train_size=0, test_size=20, partition="dirichlet", alpha=0.1,
                      partition_by="category")
    parts = [load_partition(skew, i, 4, 0) for i in range(4)]
    share = np.mean([max(Counter(p["category"]).values()) / len(p) for p in parts])
    iid_share = np.mean([max(Counter(p["category"]).values()) / len(p) for p in iid])
    assert sum(len(p) for p in parts) == 280 and share > iid_share + 0.15
    assert Meta.of(iid[0]).source == f"hub dataset {folder!r} split 'train'"  # errors name the source in clients too
    assert {kw["dataset"] for kw in made} == {folder}
    assert any(type(kw["partitioners"]["train"]).__name__ == "DirichletPartitioner" for kw in made)
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, validation\); pass --set data.split"):
        load_task(DataConfig(name=f"hub:{folder}", split="dev", test_size=5), 0)
    with pytest.raises(DataError, match="pass --set data.partition-by=<column>"):
        load_partition(DataConfig(name=f"hub:{folder}", test_size=5, partition="dirichlet", partition_by="nope"),
                       0, 2, 0)


def test_the_embedded_instruction_task_has_sentences_and_attributes():
    rows = synthetic_instruction_rows(60, seed=3)
    assert rows == synthetic_instruction_rows(60, seed=3) and rows != synthetic_instruction_rows(60, seed=4)
    assert [r["text"] for r in rows] == [r["text"] for r in synthetic_rows(60, seed=3)]  # the same patients
    for r in rows:
        assert r["output"] not in LABELS and len(r["output"].split()) >= 5 and r["output"].endswith(".")
        assert r["condition"] in CONDITIONS and r["condition"] in r["output"] and r["input"] == r["text"]
    assert len({r["output"] for r in rows}) > 20
    task = load_task(DataConfig(name="synthetic-instruct", train_size=200, test_size=50), 0)
    assert task.format == "instruction" and {"name", "age_band", "city", "condition"} <= set(task.train.column_names)
    assert task.label_names == LABELS and set(task.train["label"]) == {0, 1, 2}
    assert all(c in t for c, t in zip(task.test["condition"], task.test["text"], strict=True))
    assert task.majority_rate() < 0.2  # most common response's share: no single answer wins
    assert build_config({"data.name": "synthetic-instruct"}).data.name == "synthetic-instruct"


def test_rouge_l_is_rouge_score_s():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for pred, ref in [("The cat sat.", "the cat sat on the mat"), ("Paris.", "Paris"), ("", "x y")]:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)
    assert rouge_l("Paris.", "paris") == 1.0  # punctuation is not part of a token (it was, split on whitespace)
    assert rouge_l("Your visits are booked.", "Your visit is booked") == pytest.approx(2 * 3 / 4 * 3 / 4 / 1.5)


@pytest.mark.parametrize("recipe", ["split", "central-ft"])
@pytest.mark.e2e  # about a minute each: a tiny decoder trained on the embedded instruction task, in process
def test_a_tiny_decoder_learns_the_embedded_instruction_task(tiny_flat, recipe):
    from guardedtuning.inprocess import run_in_process

    flat = {**tiny_flat, "recipe": recipe, "model.name": "tiny-llama", "data.name": "synthetic-instruct",
            "model.max-length": 80, "federation.rounds": 3, "train.local-steps": 8, "data.test-size": 16,
            "eval.max-new-tokens": 4, "central.lr": 3e-3}
    record = run_in_process(build_config(flat))
    losses = [r["train_loss"] for r in record["history"]]
    assert losses[-1] < losses[0], losses
    last = record["history"][-1]
    assert 0 <= last["rouge_l"] <= 1 and last["eval_rows"] == 16 and "exact_match" in last
    if recipe == "central-ft":  # every weight trains: the responses get closer to the references
        assert losses[-1] < 0.5 * losses[0] and last["rouge_l"] > record["history"][0]["rouge_l"] + 0.05, \
            record["history"]
    assert record["data"]["template"] == "plain" and record["data"]["rows"]["test"] == 16
    assert record["utility"]["metric"] == "exact_match"


def test_guardedtuning_run_stops_on_a_too_long_prompt_before_any_round_in_one_line(tmp_path):
    import subprocess
    import sys

    rows = [dict(r) for r in ALPACA]
    rows[9]["input"] = "filler " * 300
    name = _write(rows, tmp_path / "long.jsonl")
    res = subprocess.run([sys.executable, "-m", "guardedtuning.cli", "run", "--out", str(tmp_path / "o"),
                          "--recipe", "fedlora", "--set", "model.name=tiny-llama", "--set", f"data.name={name}",
                          "--set", "data.test-size=5", "--set", "federation.num-clients=2",
                          "--set", "federation.clients-per-round=2"], capture_output=True, text=True, timeout=300)
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"data file {name!r} row 9 (0-based): the prompt" in lines[0] and "model.max-length=64" in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()
