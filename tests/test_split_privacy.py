"""The client's privacy knobs inside split learning: what is released, DP-SGD, budgets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.config import LoraConfig, ModelConfig, build_config
from guardedtuning.data.batches import encode
from guardedtuning.errors import ClientsFailed
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.parts import client_bottom
from guardedtuning.privacy.client import ACCOUNTANT_KEY, ClientPrivacy
from guardedtuning.privacy.dpsgd import DPAccountant
from guardedtuning.privacy.mechanisms import DChiMechanism, NoMechanism
from guardedtuning.server_app.server_app import execute
from guardedtuning.training import forward_activations
from tests.local_grid import LocalGrid

TEXTS = ["a fine day for a walk in the park", "awful", "it was ok I guess, nothing special"]


def _bottom():
    return client_bottom(ModelConfig(name="tiny-bert"), 2, LoraConfig(rank=4), "cpu", 0)


def _batch():
    return encode(load_tokenizer("tiny-bert"), "encoder", TEXTS, [2, 0, 1], max_length=32,
                  label_names=("negative", "neutral", "positive"), instruction="")


def test_released_activations_carry_dchi_noise_and_no_padding():
    bottom, batch, cfg = _bottom(), _batch(), build_config({"model.name": "tiny-bert"})
    clean = forward_activations(bottom, batch, torch.device("cpu"))
    eta = 20.0
    out = ClientPrivacy(seed=123, mechanism=DChiMechanism(eta=eta), knobs=cfg.privacy).release_batch(
        bottom, batch, torch.device("cpu"), step=0)
    noise = (out["h"] - clean)[batch.attention_mask.bool()]  # (N, D) on real tokens
    d = clean.shape[-1]
    assert abs(float(noise.norm(dim=-1).mean()) - d / eta) < 0.25 * d / eta  # Gamma(d, eta): mean d / eta
    assert torch.equal(out["h"][~batch.attention_mask.bool()], torch.zeros_like(out["h"][~batch.attention_mask.bool()]))
    plain = ClientPrivacy(seed=0, mechanism=NoMechanism(), knobs=cfg.privacy).release_batch(
        bottom, batch, torch.device("cpu"), step=0)
    torch.testing.assert_close(plain["h"], clean)


def test_quantized_release_is_a_quarter_of_the_bytes():
    bottom, batch = _bottom(), _batch()
    cfg = build_config({"model.name": "tiny-bert", "privacy.quantize-bits": 8})
    out = ClientPrivacy(seed=0, mechanism=NoMechanism(), knobs=cfg.privacy).release_batch(
        bottom, batch, torch.device("cpu"), step=0)
    assert "h" not in out and out["codes"].dtype == np.uint8
    clean = forward_activations(bottom, batch, torch.device("cpu"))
    assert out["codes"].nbytes + out["scales"].nbytes < 0.3 * clean.numel() * 4


def _run(flat, prepare=None):
    cfg = build_config(flat)
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat())
    if prepare:
        prepare(grid)
    return execute(cfg, grid), grid


@pytest.mark.parametrize("knobs", [
    {"recipe": "privtune", "privacy.mechanism": "privtune", "privacy.eta": 200.0, "privacy.rho": 0.5},
    {"privacy.mechanism": "dchi", "privacy.eta": 200.0, "privacy.quantize-bits": 8},
    {"privacy.mechanism": "gaussian", "privacy.epsilon": 8.0, "privacy.clip": 5.0, "privacy.nopeek-weight": 0.5},
])
@pytest.mark.e2e  # slow: several in-process rounds per mechanism (PrivTune builds its tables)
def test_split_runs_with_each_token_mechanism(tiny_flat, knobs, tmp_path):
    flat = {**tiny_flat, **knobs, "privacy.cache-dir": str(tmp_path / "knn")}
    record, grid = _run(flat)
    assert len(record["history"]) == 2 and record["cost"]["rejected_replies"] == 0
    priv = record["privacy"]
    assert priv["mechanism"]["name"] == flat["privacy.mechanism"]
    if flat["privacy.mechanism"] == "privtune":
        assert priv["eta"] == 200.0 and priv["mechanism"]["mean_shift_bound"] == 1.0
        assert priv["mechanism"]["eta_min"] < 200.0 < priv["mechanism"]["eta_max"]  # importance scaling
    if flat["privacy.mechanism"] == "gaussian":
        assert priv["mechanism"]["sigma"] > 0 and priv["epsilon"] == 8.0
    # no client keeps a seed (every draw is fresh); each took the rounds' steps in order
    for ctx in grid.contexts.values():
        assert "privacy.seed" not in ctx.state
        assert int(ctx.state["privacy.sequence"]["round"]) == 2
        assert int(ctx.state["privacy.sequence"]["step"]) == flat["train.local-steps"]


@pytest.mark.e2e  # slow: in-process rounds with DP-SGD
def test_dp_sgd_accounts_epsilon_per_round_within_the_target(tiny_flat):
    record, grid = _run({**tiny_flat, "dp.enabled": True, "dp.target-epsilon": 4.0, "federation.rounds": 2})
    eps = [r["epsilon"] for r in record["history"]]  # against the server: the worst row's participations
    assert eps[0] is not None and 0 < eps[0] <= eps[1] <= 4.0
    models = [r["epsilon_model"] for r in record["history"]]  # the released model's, amplified: grows per step
    assert 0 < models[0] < models[1] <= eps[1]
    assert record["privacy"]["epsilon"] == eps[1] and record["privacy"]["delta"] == 1e-5
    dp = record["privacy"]["dp"]
    assert dp["enabled"] and dp["noise_multiplier"] > 0.5 and dp["steps"] == 12  # 2 rounds x 6 steps
    for ctx in grid.contexts.values():  # the accountant persists in each client's state
        acc = DPAccountant()
        acc.load_state_dict({k: v.numpy() for k, v in ctx.state[ACCOUNTANT_KEY].items()})
        assert acc.steps == 12


def _spend(node_ids):
    def prepare(grid):
        acc = DPAccountant()
        acc.record(noise_multiplier=0.3, sample_rate=1.0, steps=5000)
        for n in node_ids:
            grid.contexts[n].state[ACCOUNTANT_KEY] = ArrayRecord({k: Array(v) for k, v in acc.state_dict().items()})
    return prepare


@pytest.mark.e2e  # slow: in-process rounds with DP-SGD
def test_a_client_whose_budget_is_spent_stops_and_says_so(tiny_flat):
    record, _ = _run({**tiny_flat, "dp.enabled": True}, prepare=_spend([1000]))
    events = [json.loads(x) for x in (Path(tiny_flat["output.dir"]) / "events.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["event"] == "dropped"]
    assert {e["node"] for e in dropped} == {1000} and len(dropped) == 2
    assert "privacy budget spent" in dropped[0]["reason"]
    assert len(record["history"]) == 2  # the others went on


def test_when_every_budget_is_spent_the_run_stops(tiny_flat):
    with pytest.raises(ClientsFailed, match="every sampled client has spent its privacy budget"):
        _run({**tiny_flat, "dp.enabled": True}, prepare=_spend([1000, 1001, 1002]))


def test_the_client_backpropagates_through_the_clip_it_released():
    from guardedtuning.models.lora import trainable_state
    from guardedtuning.privacy.dchi import clip_tokens

    bottom, batch = _bottom(), _batch()
    cfg = build_config({"model.name": "tiny-bert", "privacy.mechanism": "gaussian", "privacy.clip": 2.0})
    torch.manual_seed(0)
    w = torch.randn(*batch.input_ids.shape, 64)  # the server's gradient for the released values
    # reference: d/dparams of sum(w * clip(bottom(x)))
    bottom.zero_grad()
    (w * clip_tokens(bottom(batch.input_ids, batch.attention_mask), clip=2.0)).sum().backward()
    expected = {n: p.grad.clone() for n, p in bottom.named_parameters() if p.requires_grad}
    before = trainable_state(bottom)
    opt = torch.optim.SGD([p for p in bottom.parameters() if p.requires_grad], lr=1.0)
    priv = ClientPrivacy(seed=0, mechanism=NoMechanism(), knobs=cfg.privacy)
    priv.backward(bottom, opt, batch, w, torch.device("cpu"), step=0)
    after = trainable_state(bottom)
    for n, g in expected.items():
        torch.testing.assert_close(before[n] - after[n], g, rtol=1e-4, atol=1e-6)
    from guardedtuning.models.lora import load_trainable

    load_trainable(bottom, before, source="test")  # leave the cached bottom as it was


def test_malformed_quantized_activations_drop_the_client_not_the_run(tiny_flat):
    def tamper(node, request, reply):
        if node == 1001 and not reply.has_error() and "acts" in reply.content:
            acts = reply.content["acts"]
            scales = acts["scales"].numpy().copy()
            scales[...] = np.float32(3e38)  # decodes to inf
            acts["scales"] = Array(scales)
        return reply

    cfg = build_config({**tiny_flat, "privacy.mechanism": "dchi", "privacy.quantize-bits": 8})
    record = execute(cfg, LocalGrid(client_app, 3, cfg.flat(), tamper=tamper))
    events = [json.loads(x) for x in (Path(tiny_flat["output.dir"]) / "events.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["event"] == "dropped"]
    assert {e["node"] for e in dropped} == {1001} and "non-finite" in dropped[0]["reason"]
    assert all(np.isfinite(r["train_loss"]) for r in record["history"])


@pytest.mark.e2e  # slow: a DP-SGD run, crashed and resumed
def test_a_resumed_dp_run_charges_the_rounds_before_the_crash(tiny_flat, tmp_path):
    """Fresh accountants after a restart count every earlier round: epsilon continues, never restarts.

    A client that lost its state counts each row in every step before the restart (up to
    the cap): the cap is set to the planned steps so that it can go on.
    """
    flat = {**tiny_flat, "dp.enabled": True, "federation.rounds": 2, "dp.max-participations": 12}
    whole, _ = _run({**flat, "output.dir": str(tmp_path / "whole")})
    cfg = build_config(flat)
    grid = LocalGrid(client_app, 3, cfg.flat())
    original, pushes = grid.push_messages, {"n": 0}

    def crashing_push(messages):
        pushes["n"] += 1
        if pushes["n"] == cfg.train.local_steps + 1 + 2:  # inside round 2
            raise RuntimeError("simulated crash")
        return original(messages)

    grid.push_messages = crashing_push
    with pytest.raises(RuntimeError):
        execute(cfg, grid)
    resumed = execute(cfg, LocalGrid(client_app, 3, cfg.flat()))
    eps = [r["epsilon"] for r in resumed["history"]]
    assert eps[1] > eps[0] > 0
    # the server's ledger charged what it sent before the crash (round 1, and round 2's first DP step, charged
    # before its message was pushed): never less than the uninterrupted run, against the server (every row
    # counts the steps before the restart) or for the model
    models = [r["epsilon_model"] for r in resumed["history"]]
    assert models[1] > whole["history"][1]["epsilon_model"] and eps[1] >= whole["history"][1]["epsilon"]


