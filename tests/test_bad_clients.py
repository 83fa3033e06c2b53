"""Issue 12, finding 5: one bad client can neither poison nor stop the run.

Each attack is run for real: through the drivers against the real ClientApp (a
``tamper`` on the in-process grid rewrites one client's reply), or against the server-side
checks directly. Then a seeded fuzzer sends thousands of malformed replies through
``unpack_acts``, ``unpack_release`` and ``AdapterFedAvg.aggregate_train``: each is rejected
with a MessageError, or accepted and harmless (finite, bounded).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from guardedtuning import compat
from guardedtuning.clients.client_app import app as client_app
from guardedtuning.config import build_config
from guardedtuning.errors import MessageError
from guardedtuning.results import read_checkpoint
from guardedtuning.server_app.server_app import execute
from guardedtuning.strategies.fedavg import AdapterFedAvg
from guardedtuning.wire import gradfree, split
from tests.local_grid import LocalGrid


@pytest.fixture(autouse=True)
def _task():
    task = compat.private("TaskIdentity")
    task.task_id, task.run_id, task.node_id = 1, 1, 1


def _run(flat, tamper):
    cfg = build_config(flat)
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat(), tamper=tamper)
    return execute(cfg, grid), grid


def _events(flat):
    return [json.loads(x) for x in (Path(flat["output.dir"]) / "events.jsonl").read_text().splitlines()]


def _checkpoint(flat):
    return read_checkpoint(flat["output.dir"])["state"]


def _rewrite_acts(target, at_call, rewrite):
    """A tamper that rewrites ``target``'s ``at_call``-th activations reply with ``rewrite(acts record)``."""
    calls = {"n": 0}

    def tamper(node, request, reply: Message):
        if node != target or reply.has_error() or "acts" not in reply.content:
            return reply
        calls["n"] += 1
        if calls["n"] == at_call:
            rewrite(reply.content["acts"])
        return reply

    return tamper


# ------------------------------------------------------------------ the four attacks, end to end

def test_finite_float64_1e300_activations_cannot_turn_the_top_to_nan(tiny_flat):
    """1e300 is finite in float64 but inf after the cast: the sender is dropped, the top stays finite."""
    def huge(acts):
        acts["h"] = Array(np.full(acts["h"].numpy().shape, 1e300, dtype=np.float64))

    record, _ = _run(tiny_flat, _rewrite_acts(1001, 2, huge))
    assert len(record["history"]) == 2 and record["utility"]["value"] is not None
    top = _checkpoint(tiny_flat)["top"]
    assert top and all(bool(torch.isfinite(v).all()) for v in top.values()), "the top was poisoned"
    dropped = [e for e in _events(tiny_flat) if e["event"] == "dropped"]
    assert [(d["round"], d["node"]) for d in dropped] == [(1, 1001)]
    assert "non-finite after the cast" in dropped[0]["reason"]


def test_activations_just_inside_float32_are_rejected_by_the_token_norm_bound(tiny_flat):
    """Finite float32 activations of 1e30 pass the finite check but not the per-token norm bound."""
    def big(acts):
        acts["h"] = Array(np.full(acts["h"].numpy().shape, 1e30, dtype=np.float32))

    record, _ = _run(tiny_flat, _rewrite_acts(1000, 3, big))
    top = _checkpoint(tiny_flat)["top"]
    assert all(bool(torch.isfinite(v).all()) for v in top.values())
    dropped = [e for e in _events(tiny_flat) if e["event"] == "dropped"]
    assert [d["node"] for d in dropped] == [1000] and "MAX_TOKEN_NORM" in dropped[0]["reason"]
    assert len(record["history"]) == 2


def test_a_sequence_longer_than_model_max_length_is_rejected(tiny_flat):
    """T is bounded by ``model.max-length`` (32 here): a client sending 50x longer sequences is dropped."""
    def long(acts):
        h, mask = acts["h"].numpy(), acts["mask"].numpy()
        (b, t), d = mask.shape, h.shape[-1]  # h is (B, T, D), or (N, D) with split.trim-padding
        acts["h"] = Array(np.zeros((b, 50 * t, d), dtype=np.float32))
        acts["mask"] = Array(np.ones((b, 50 * t), dtype=mask.dtype))

    record, _ = _run(tiny_flat, _rewrite_acts(1002, 1, long))
    dropped = [e for e in _events(tiny_flat) if e["event"] == "dropped"]
    assert [d["node"] for d in dropped] == [1002] and "model.max-length" in dropped[0]["reason"]
    assert len(record["history"]) == 2


def test_a_float64_1e300_update_is_rejected_and_the_run_goes_on(tiny_flat):
    """Before: the aggregate became inf in float32 and a MessageError stopped the run."""
    def tamper(node, request, reply):
        if node == 1002 and not reply.has_error() and "update" in reply.content:
            upd: ArrayRecord = reply.content["update"]
            for key in list(upd.keys()):
                upd[key] = Array(np.full(upd[key].numpy().shape, 1e300, dtype=np.float64))
        return reply

    record, _ = _run({**tiny_flat, "recipe": "fedlora"}, tamper)
    assert len(record["history"]) == 2 and record["utility"]["value"] is not None
    assert record["cost"]["rejected_replies"] == 2  # node 1002, once a round


SHAPES = {"a": (2, 3), "b": (4,)}


def _reply(node, arrays, n, request, dtype=np.float32):
    content = RecordDict({"update": ArrayRecord({k: Array(np.asarray(v, dtype=dtype)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": float(n)})})
    msg = Message(content, reply_to=request)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _strategy(k=3, **kw):
    grid = LocalGrid(ClientApp(), 4, {})
    strat = AdapterFedAvg(clients_per_round=k, seed=0, **kw)
    zeros = ArrayRecord({k_: Array(np.zeros(s, dtype=np.float32)) for k_, s in SHAPES.items()})
    msgs = list(strat.configure_train(1, zeros, ConfigRecord({}), grid))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return strat, msgs


def test_an_unbounded_num_examples_cannot_make_fedavg_one_clients_update():
    """A client claiming 1e12 examples is counted as ``max-weight`` (default 1024, as aggregation.max-weight)."""
    strat, msgs = _strategy()
    honest = {k: np.ones(s) for k, s in SHAPES.items()}
    evil = {k: np.full(s, -100.0) for k, s in SHAPES.items()}
    replies = [_reply(msgs[0].metadata.dst_node_id, honest, 1000, msgs[0]),
               _reply(msgs[1].metadata.dst_node_id, honest, 1000, msgs[1]),
               _reply(msgs[2].metadata.dst_node_id, evil, 1e12, msgs[2])]
    avg, metrics = strat.aggregate_train(1, replies)
    expected = (2 * 1000 * 1.0 + 1024 * -100.0) / (2000 + 1024)
    np.testing.assert_allclose(avg["a"].numpy(), expected, rtol=1e-5)
    assert metrics["num-examples"] == 2000 + 1024
    # and the cap is the configured one
    strat, msgs = _strategy(max_weight=1)
    replies = [_reply(m.metadata.dst_node_id, u, w, m) for m, u, w in zip(msgs, (honest, honest, evil),
                                                                         (5, 5, 1e12), strict=True)]
    avg, _ = strat.aggregate_train(1, replies)
    np.testing.assert_allclose(avg["b"].numpy(), (1 + 1 - 100) / 3, rtol=1e-5)


# ------------------------------------------------------------------ the top step drops a non-finite client

def test_a_client_whose_loss_is_non_finite_is_dropped_before_the_top_steps():
    from guardedtuning.config import LoraConfig, ModelConfig
    from guardedtuning.models.lora import trainable_state
    from guardedtuning.models.parts import split_model
    from guardedtuning.server_app.split_driver import top_step_nonempty
    from guardedtuning.training import ClientActs, make_optimizer

    model = split_model(ModelConfig(name="tiny-bert"), 2, LoraConfig(rank=4), 3, "cpu", 0)
    opt = make_optimizer(model.top, lr=0.1, weight_decay=0.0)
    d = int(model.bottom.word_embeddings().shape[1])
    gen = torch.Generator().manual_seed(0)
    good = ClientActs(torch.randn(3, 5, d, generator=gen), torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 2]))
    # finite, but overflows inside the top (bypassing the wire checks: the top must defend itself)
    bad = ClientActs(torch.full((2, 5, d), 3e38), torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 1]))
    grads, losses, dropped = top_step_nonempty(model.top, opt, {7: good, 8: bad}, torch.device("cpu"))
    assert set(dropped) == {8} and "non-finite" in dropped[8]
    assert set(grads) == {7} and bool(torch.isfinite(grads[7]).all()) and len(losses) == 1
    assert all(bool(torch.isfinite(v).all()) for v in trainable_state(model.top).values())


# ------------------------------------------------------------------ fuzzing the server-side checks

HIDDEN, MAX_BATCH, NUM_LABELS, MAX_LEN = 4, 3, 3, 8
SPECIAL = (np.nan, np.inf, -np.inf, 1e300, -1e300, 3e38, 1e30, 1e6, 0.0, -0.0, 1e-320)


def _fuzz_array(rng: np.random.Generator, good_shape: tuple[int, ...], good_dtype) -> np.ndarray:
    """Mostly almost-right arrays: one thing off (shape, dtype, a special value)."""
    shape = list(good_shape)
    what = rng.integers(0, 9)  # 5..8: well-formed (5: large integers)
    if what == 0 and shape:  # wrong shape
        i = int(rng.integers(0, len(shape)))
        shape[i] = int(rng.choice([0, 1, shape[i] + 1, 50 * max(shape[i], 1), 2]))
    elif what == 1:  # wrong rank
        shape = shape[:-1] if shape and rng.random() < 0.5 else [*shape, 2]
    dtype = good_dtype
    if what == 2:
        dtype = rng.choice([np.float64, np.float16, np.float32, np.int64, np.int8, np.uint8, np.bool_, np.complex64])
    size = int(np.prod(shape)) if shape else 1
    if size > 100_000:
        shape, size = [size // 1000 or 1], size // 1000 or 1
    base = rng.normal(size=size) * 3
    if what in (3, 4) and size:
        idx = rng.integers(0, size, size=int(rng.integers(1, size + 1)))
        base[idx] = rng.choice(SPECIAL, size=len(idx))
    if np.dtype(dtype).kind in "iub":
        base = np.nan_to_num(base, nan=0, posinf=1e9, neginf=-1e9)
        base = np.clip(np.round(base if what != 5 else base * 1e6), -2**31, 2**31)
    with np.errstate(all="ignore"):
        return np.asarray(base, dtype=np.float64).astype(dtype).reshape(shape)


def _fuzz_acts(rng: np.random.Generator) -> dict[str, np.ndarray]:
    b, t = int(rng.integers(0, MAX_BATCH + 1)), int(rng.integers(1, MAX_LEN + 1))
    acts: dict[str, np.ndarray] = {
        "h": _fuzz_array(rng, (b, t, HIDDEN), rng.choice([np.float32, np.float64, np.float16])),
        "mask": _fuzz_array(rng, (b, t), np.uint8) if rng.random() < 0.7 else np.ones((b, t), np.uint8),
        "labels": rng.integers(-2, NUM_LABELS + 2, size=(b,)) if rng.random() < 0.5
        else rng.integers(0, NUM_LABELS, size=(b,)),
    }
    if rng.random() < 0.2:  # quantized uplink, fuzzed
        acts.pop("h")
        acts["codes"] = _fuzz_array(rng, (b, t, HIDDEN), np.uint8)
        acts["scales"] = _fuzz_array(rng, (b, t), np.float32)
        acts["meta"] = np.array([rng.choice([8, 4, 3, -1]), rng.choice([HIDDEN, HIDDEN + 1, 0])], np.int32)
    if rng.random() < 0.15:  # a missing or extra key
        acts.pop(str(rng.choice(sorted(acts))))
    if rng.random() < 0.1:
        acts["extra"] = rng.normal(size=3)
    return acts


def _harmless(h: torch.Tensor) -> bool:
    norms = h.float().norm(dim=-1) if h.numel() else torch.zeros(0)
    return bool(torch.isfinite(h).all()) and bool((norms <= split.MAX_TOKEN_NORM).all())


def _as_reply(content: RecordDict) -> Message:
    request = Message(RecordDict(), dst_node_id=9, message_type=split.MESSAGE_TYPE)
    request.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return Message(content, reply_to=request)


def test_fuzz_unpack_acts_rejects_or_accepts_harmlessly():
    rng = np.random.default_rng(12)
    rejected = accepted = 0
    for _ in range(1200):
        acts = _fuzz_acts(rng)
        content = RecordDict({"acts": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in acts.items()})})
        if rng.random() < 0.05:
            content = RecordDict({"acts": ConfigRecord({"h": 1.0})} if rng.random() < 0.5 else {})
        try:
            got = split.unpack_acts(_as_reply(content), hidden=HIDDEN, max_batch=MAX_BATCH, num_labels=NUM_LABELS,
                                    kind="encoder", max_length=MAX_LEN)
        except MessageError:
            rejected += 1
            continue
        accepted += 1
        assert _harmless(got.h), "accepted activations that are non-finite or beyond MAX_TOKEN_NORM"
        assert got.h.dtype == torch.float32 and got.h.shape[1] <= MAX_LEN and got.h.shape[0] <= MAX_BATCH
        assert tuple(got.attention_mask.shape) == tuple(got.h.shape[:2])
    assert rejected > 100 and accepted > 50  # both branches are exercised


def test_fuzz_unpack_release_rejects_or_accepts_harmlessly():
    rng = np.random.default_rng(34)
    rejected = accepted = 0
    for _ in range(1200):
        acts = _fuzz_acts(rng)
        acts.pop("labels", None)
        if rng.random() < 0.1:
            acts["labels"] = np.zeros(2, np.int64)  # labels never leave the client
        content = RecordDict({"acts": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in acts.items()})})
        try:
            h, mask = gradfree.unpack_release(_as_reply(content), hidden=HIDDEN, max_rows=MAX_BATCH,
                                              max_length=MAX_LEN)
        except MessageError:
            rejected += 1
            continue
        accepted += 1
        assert _harmless(h) and h.dtype == torch.float32 and h.shape[1] <= MAX_LEN
        assert tuple(mask.shape) == tuple(h.shape[:2])
    assert rejected > 100 and accepted > 50


def test_fuzz_fedavg_rejects_or_aggregates_harmlessly():
    rng = np.random.default_rng(56)
    strat, msgs = _strategy(k=3)
    rejected = accepted = 0
    for _ in range(400):  # 3 replies each: 1,200 replies
        replies = []
        for m in msgs:
            node = m.metadata.dst_node_id
            update = {k: _fuzz_array(rng, s, rng.choice([np.float32, np.float64, np.float16]))
                      if rng.random() < 0.5 else rng.normal(size=s) for k, s in SHAPES.items()}
            if rng.random() < 0.1:
                update.pop("a")
            if rng.random() < 0.1:
                update["zz"] = np.ones(2)
            weight = rng.choice([1.0, 7.0, 0.0, -3.0, 1e12, 1e300, np.nan, np.inf, 2.5, 30.0, 1024.0, 5000.0])
            content = RecordDict({"update": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in update.items()}),
                                  "metrics": MetricRecord({"num-examples": float(weight)})})
            if rng.random() < 0.05:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 1.0})})
            reply = Message(content, reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        before = len(strat.rejections)
        out, metrics = strat.aggregate_train(1, replies)
        rejected += len(strat.rejections) - before
        if out is None:
            continue
        accepted += 3 - (len(strat.rejections) - before)
        for k, s in SHAPES.items():
            arr = out[k].numpy()
            assert arr.dtype == np.float32 and arr.shape == s and np.isfinite(arr).all()
        assert 0 < metrics["num-examples"] <= 3 * 1024
    assert rejected > 300 and accepted > 100
