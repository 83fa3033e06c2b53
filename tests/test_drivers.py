"""The ServerApp drivers against the real ClientApp, in process (tests/local_grid.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.config import build_config
from guardedtuning.results import read_checkpoint
from guardedtuning.server_app.server_app import execute
from tests.local_grid import LocalGrid

CONTRACT = {"schema", "recipe", "config", "model", "dataset", "num_clients", "clients_per_round", "rounds",
            "history", "utility", "privacy", "cost"}
COST = {"bytes_up_per_client_round", "bytes_down_per_client_round", "dense_bytes_per_client_round",
        "client_peak_mem_mb", "client_train_s", "server_s", "wall_s"}


def _run(flat, tamper=None):
    cfg = build_config(flat)
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat(), tamper=tamper)
    return execute(cfg, grid), grid


def check_contract(record):
    assert CONTRACT <= set(record)
    assert COST <= set(record["cost"])
    for row in record["history"]:
        assert {"round", "utility", "train_loss", "epsilon", "bytes_up", "bytes_down", "wall_s"} <= set(row)


@pytest.mark.parametrize(("recipe", "model"), [("split", "tiny-bert"), ("fedlora", "tiny-bert"),
                                               ("split", "tiny-llama")])
@pytest.mark.e2e  # slow: three-round trainings of three recipe/model pairs
def test_recipe_learns_and_writes_the_record(tiny_flat, recipe, model):
    record, grid = _run({**tiny_flat, "recipe": recipe, "model.name": model, "federation.rounds": 3})
    check_contract(record)
    losses = [r["train_loss"] for r in record["history"]]
    assert losses[-1] < losses[0], losses
    metric = "accuracy" if model == "tiny-bert" else "exact_match"
    assert record["utility"]["metric"] == metric and 0 <= record["utility"]["value"] <= 1
    if model == "tiny-llama":
        assert 0 <= record["history"][-1]["rouge_l"] <= 1
    assert record["cost"]["bytes_up_per_client_round"] > 0
    on_disk = json.loads((Path(tiny_flat["output.dir"]) / "results.json").read_text())
    assert on_disk["history"] == record["history"]
    # client state of a finished round is dropped: nothing grows with the number of rounds
    assert all(len(ctx.state) == 0 for ctx in grid.contexts.values())


def test_split_sends_one_message_per_step_and_global_adapter_moves(tiny_flat):
    record, grid = _run(tiny_flat)
    steps, rounds, clients = 6, 2, 3
    assert len(grid.sent) == rounds * clients * (steps + 1)
    assert {m.metadata.message_type for m in grid.sent} == {"train.split"}
    ckpt = read_checkpoint(tiny_flat["output.dir"])
    moved = [float(v.abs().sum()) for k, v in ckpt["state"]["global_bottom"].items() if "lora_B" in k]
    assert moved and all(m > 0 for m in moved)  # lora_B starts at zero
    # what a client keeps between messages is reported, and it is about the adapter's size, not the data's
    adapter_bytes = 4 * sum(v.numel() for v in ckpt["state"]["global_bottom"].values())
    state = record["cost"]["client_state_bytes_max"]
    assert state is not None and 0 <= state <= 4 * adapter_bytes + 4096


def _corrupt_acts(target_node, at_call):
    calls = {"n": 0}

    def tamper(node, request, reply: Message):
        if node != target_node or reply.has_error() or "acts" not in reply.content:
            return reply
        calls["n"] += 1
        if calls["n"] == at_call:
            acts = reply.content["acts"]
            h = acts["h"].numpy()
            acts["h"] = Array(np.ascontiguousarray(h[..., :-1]))  # wrong hidden size ((B, T, D) or trimmed (N, D))
        return reply

    return tamper


def test_a_malformed_reply_is_rejected_and_the_round_goes_on(tiny_flat):
    record, grid = _run(tiny_flat, tamper=_corrupt_acts(1001, at_call=3))
    assert record["cost"]["rejected_replies"] == 1
    assert len(record["history"]) == 2 and record["utility"]["value"] is not None
    events = [json.loads(x) for x in (Path(tiny_flat["output.dir"]) / "events.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["event"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["node"] == 1001 and "expected float (N, 64)" in dropped[0]["reason"]  # trimmed by default


def test_a_nan_update_is_rejected_by_the_strategy(tiny_flat):
    def tamper(node, request, reply):
        if node == 1002 and not reply.has_error() and "update" in reply.content:
            upd: ArrayRecord = reply.content["update"]
            key = next(iter(upd.keys()))
            arr = upd[key].numpy().copy()
            arr.flat[0] = np.nan
            upd[key] = Array(arr)
        return reply

    record, _ = _run({**tiny_flat, "recipe": "fedlora"}, tamper=tamper)
    assert record["cost"]["rejected_replies"] == 2  # one per round
    assert record["utility"]["value"] is not None


def _events(flat):
    return [json.loads(x) for x in (Path(flat["output.dir"]) / "events.jsonl").read_text().splitlines()]


def test_a_client_error_drops_that_client_for_the_round(tiny_flat):
    seen = {"n": 0}

    def tamper(node, request, reply):
        if node == 1000 and not reply.has_error() and "acts" in reply.content:
            seen["n"] += 1
            if seen["n"] == 2:  # step 1 of round 1
                return Message(Error(code=0, reason="boom"), reply_to=request)
        return reply

    record, grid = _run(tiny_flat, tamper=tamper)
    dropped = [e for e in _events(tiny_flat) if e["event"] == "dropped"]
    assert [(d["round"], d["node"]) for d in dropped] == [(1, 1000)] and "boom" in dropped[0]["reason"]
    # node 1000 got no further message in round 1, and all of round 2
    round1 = [m for m in grid.sent if m.content["config"]["server-round"] == 1 and m.metadata.dst_node_id == 1000]
    assert len(round1) == 2
    assert record["cost"]["rejected_replies"] == 1 and len(record["history"]) == 2



def test_crash_resumes_from_the_last_checkpoint(tiny_flat):
    class Crash(RuntimeError):
        pass

    cfg = build_config(tiny_flat)
    grid = LocalGrid(client_app, 3, cfg.flat())
    pushes = {"n": 0}
    original = grid.push_messages

    def crashing_push(messages):
        pushes["n"] += 1
        if pushes["n"] == 7 + 2:  # round 1 has 7 exchanges; crash inside round 2
            raise Crash("simulated crash")
        return original(messages)

    grid.push_messages = crashing_push
    with pytest.raises(Crash):
        execute(cfg, grid)
    record = execute(cfg, LocalGrid(client_app, 3, cfg.flat()))
    assert [r["round"] for r in record["history"]] == [1, 2]
    events = (Path(tiny_flat["output.dir"]) / "events.jsonl").read_text()
    assert '"event": "resume", "time"' in events and '"round": 1}' in events


@pytest.mark.e2e  # slow: two in-process runs compared
def test_a_resumed_run_computes_what_an_uninterrupted_run_computes(tiny_flat, tmp_path):
    whole, _ = _run({**tiny_flat, "output.dir": str(tmp_path / "whole")})
    cfg = build_config(tiny_flat)
    grid = LocalGrid(client_app, 3, cfg.flat())
    original, pushes = grid.push_messages, {"n": 0}

    def crashing_push(messages):
        pushes["n"] += 1
        if pushes["n"] == 7 + 3:
            raise RuntimeError("simulated crash")
        return original(messages)

    grid.push_messages = crashing_push
    with pytest.raises(RuntimeError):
        execute(cfg, grid)
    resumed = execute(cfg, LocalGrid(client_app, 3, cfg.flat()))
    for a, b in zip(whole["history"], resumed["history"], strict=True):
        assert a["utility"] == b["utility"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    # running a finished run again reports the same record instead of failing
    again = execute(cfg, LocalGrid(client_app, 3, cfg.flat()))
    assert again["utility"]["value"] == resumed["utility"]["value"] and again["history"] == resumed["history"]


@pytest.mark.parametrize("secure", [False, True])
def test_when_every_client_fails_the_run_stops_with_the_reason(tiny_flat, secure):
    """Also under secure aggregation, where the first messages a client answers are the key stages."""
    from guardedtuning.errors import ClientsFailed

    def tamper(node, request, reply):
        return Message(Error(code=0, reason=f"DataError: partition {node} is broken"), reply_to=request)

    flat = {**tiny_flat, "aggregation.secure": secure}
    with pytest.raises(ClientsFailed, match="round 1: no client could take part; first reason: .*partition 100. is broken"):
        _run(flat, tamper=tamper)
    events = [json.loads(line) for line in (Path(flat["output.dir"]) / "events.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["event"] == "dropped"]) == 3  # each sampled client, once


@pytest.mark.e2e  # slow: an in-process training run
def test_a_frozen_top_still_trains_the_bottom(tiny_flat):
    record, _ = _run({**tiny_flat, "model.name": "tiny-llama", "lora.top": False})
    assert len(record["history"]) == 2 and record["cost"]["rejected_replies"] == 0


def test_resume_refuses_a_checkpoint_of_another_config(tiny_flat):
    _run(tiny_flat)
    with pytest.raises(Exception, match="another config"):
        _run({**tiny_flat, "train.lr": 1e-4})


def test_a_silent_client_times_out_and_the_round_goes_on(tiny_flat):
    def tamper(node, request, reply):
        if node == 1002 and request.content["config"]["server-round"] == 2 and "acts" in reply.content:
            return None  # never answers
        return reply

    record, _ = _run({**tiny_flat, "comm.timeout": 0.5}, tamper=tamper)
    dropped = [e for e in _events(tiny_flat) if e["event"] == "dropped"]
    assert [(d["round"], d["node"]) for d in dropped] == [(2, 1002)] and "comm.timeout" in dropped[0]["reason"]
    assert len(record["history"]) == 2
