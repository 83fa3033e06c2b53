"""A resumed run whose clients' DP-SGD budgets are spent stops with a record line, not a crash (issue 17, item 3).

A ServerApp killed mid-round leaves the ledger's charge of the steps it sent (their
releases happened); the re-run round is charged again, and a plan calibrated to exactly
``federation.rounds x train.local-steps`` steps may have no room for it. The resumed run
must neither train past the budget nor fail without a record: it stops after the last
round that fit, with a ``budget_spent`` event and ``stopped`` in ``results.json``. A run
in which not one round fit its budget is still an error (the plan itself is wrong;
tests/test_split_privacy.py::test_when_every_budget_is_spent_the_run_stops).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.config import build_config
from guardedtuning.server_app import engine
from guardedtuning.server_app.server_app import execute
from tests.local_grid import LocalGrid
from tests.test_split_privacy import _spend


def test_a_resumed_run_whose_budgets_are_spent_stops_and_records_why(tiny_flat, monkeypatch):
    flat = {**tiny_flat, "dp.enabled": True, "federation.rounds": 2, "train.local-steps": 1}
    cfg = build_config(flat)
    grid = LocalGrid(client_app, 3, cfg.flat())
    original, pushes = grid.push_messages, {"n": 0}

    def crashing_push(messages):  # the ServerApp dies inside round 2, after its first step was sent
        pushes["n"] += 1
        if pushes["n"] == cfg.train.local_steps + 1 + 2:
            raise RuntimeError("simulated crash")
        return original(messages)

    grid.push_messages = crashing_push
    with pytest.raises(RuntimeError):
        execute(cfg, grid)
    out = Path(flat["output.dir"])
    ledger = json.loads((out / "privacy-ledger.json").read_text())["nodes"]
    assert all(2 in n["rounds"] for n in ledger.values())  # round 2's first step is charged
    again = LocalGrid(client_app, 3, cfg.flat())
    _spend(sorted(again.contexts))(again)  # every client's accountant: no room for round 2's re-run
    finished = []
    monkeypatch.setattr(engine.Design, "finish", lambda self: finished.append(type(self).__name__))
    record = execute(cfg, again)  # before: ClientsFailed, no results.json
    assert finished, "the design's finish() (e.g. offsite's own block of the record) was skipped"
    assert [h["round"] for h in record["history"]] == [1]
    assert record["stopped"]["after_round"] == 1 and record["stopped"]["reason"] == "privacy budget spent"
    assert json.loads((out / "results.json").read_text())["stopped"] == record["stopped"]
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert "resume" in kinds and "error" not in kinds[kinds.index("resume"):]
    (spent,) = [e for e in events if e["event"] == "budget_spent"]
    assert spent["round"] == 2 and spent["rounds_done"] == 1
    assert "every sampled client has spent its privacy budget" in spent["message"]
    assert "dp.target-epsilon" in spent["message"]
    # the ledger kept the interrupted attempt's charge and never lowered it
    after = json.loads((out / "privacy-ledger.json").read_text())["nodes"]
    assert all(after[n]["requested_steps"] >= ledger[n]["requested_steps"] for n in ledger)
    # the model is round 1's: the checkpoint, the adapter folder and the reported utility
    assert json.loads((out / "checkpoint.json").read_text())["round"] == 1
    assert json.loads((out / "adapter" / "guardedtuning.json").read_text())["round"] == 1
    assert record["utility"]["value"] == record["history"][-1]["utility"]
