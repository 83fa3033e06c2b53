"""Secure sparse aggregation as the strategy of the federated recipes (in-process grid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.config import build_config
from guardedtuning.results import read_checkpoint
from guardedtuning.server_app.server_app import execute
from tests.local_grid import LocalGrid


def _flat(tiny_flat, **extra):
    return {**tiny_flat, "federation.num-clients": 5, "federation.clients-per-round": 5,
            "aggregation.secure": True, **extra}


def _run(flat, tamper=None):
    cfg = build_config(flat)
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat(), tamper=tamper)
    return execute(cfg, grid), grid


@pytest.mark.parametrize("recipe", ["split", "fedlora"])
def test_secure_rounds_update_the_global_adapter(tiny_flat, recipe):
    record, grid = _run(_flat(tiny_flat, recipe=recipe))
    assert record["cost"]["rejected_replies"] == 0 and len(record["history"]) == 2
    state = read_checkpoint(tiny_flat["output.dir"])["state"]
    adapter = state["global_bottom"] if recipe == "split" else state["global"]
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)
    # each client keeps its error-feedback residual and round keys: about an adapter, not its data
    adapter_bytes = 4 * sum(v.numel() for v in adapter.values())
    assert adapter_bytes < record["cost"]["client_state_bytes_max"] <= 4 * adapter_bytes + 64 * 1024
    # the mod answered the key and unmask stages (they ride on the round's own message type)
    stages = {m.content["secagg-stage"]["stage"] for m in grid.sent if "secagg-stage" in m.content}
    assert stages == {"advertise", "share-keys", "collect-masked", "consistency", "unmask"}
    assert {m.metadata.message_type for m in grid.sent} == {"train.split" if recipe == "split" else "train"}
    assert not [m for m in grid.sent if m.content.get("secagg-stage", {}).get("stage") == "collect-masked"
                and "arrays" not in m.content]  # the mask request rides on the round's first message
    # no client ever sent its update, or its example count, in the clear
    replies = [m for m in grid.received if not m.has_error()]
    assert replies and all("update" not in m.content and "arrays" not in m.content for m in replies)
    assert sum("secagg-masked" in m.content for m in replies) == 2 * 5  # one sealed update per client and round
    assert all("num-examples" not in m.content.get("metrics", {}) for m in replies)


def test_fedlora_uploads_far_less_than_dense_fp32(tiny_flat):
    record, _ = _run(_flat(tiny_flat, recipe="fedlora"))
    cost = record["cost"]
    assert cost["bytes_up_per_client_round"] < 0.2 * cost["dense_bytes_per_client_round"]


def test_a_client_dropped_mid_round_still_gives_an_aggregate(tiny_flat):
    seen = {"n": 0}

    def tamper(node, request, reply):
        if node == 1003 and "secagg-masked" in reply.content:
            seen["n"] += 1
            if seen["n"] == 1:  # its masked upload (the sealed final reply) of round 1 never arrives
                return None
        return reply

    record, grid = _run(_flat(tiny_flat, **{"comm.timeout": 1.0}), tamper=tamper)
    events = [json.loads(x) for x in (Path(tiny_flat["output.dir"]) / "events.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["event"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["node"] == 1003 and dropped[0]["round"] == 1
    assert "no reply before comm.timeout" in dropped[0]["reason"]
    unmask = [m for m in grid.sent if m.content.get("secagg-stage", {}).get("stage") == "unmask"
              and m.content["secagg-stage"]["server-round"] == 1]
    assert len(unmask) == 4 and all(1003 in m.content["secagg-stage"]["dropped"] for m in unmask)
    assert not [e for e in events if e["event"] == "refused"]
    assert len(record["history"]) == 2 and record["history"][0]["train_loss"] is not None


def test_secure_needs_two_clients_per_round(tiny_flat):
    from guardedtuning.recipes import build_config as build_recipe_config
    from guardedtuning.strategies.fedavg import AdapterFedAvg
    from guardedtuning.strategies.secure import SecureAggregation, SecureSparseFedAvg

    with pytest.raises(Exception, match="one client has no one to hide among"):
        build_recipe_config({**tiny_flat, "aggregation.secure": True, "federation.clients-per-round": 1})
    with pytest.raises(ValueError, match="one client has no one to hide among"):
        SecureSparseFedAvg(clients_per_round=1, seed=0)
    with pytest.raises(ValueError, match="num_sampled_clients"):
        SecureAggregation(AdapterFedAvg(clients_per_round=1, seed=0), num_sampled_clients=1)


def test_a_threshold_no_round_can_meet_is_refused_up_front(tiny_flat):
    from guardedtuning.errors import ConfigError
    from guardedtuning.server_app.common import make_strategy

    cfg = build_config({**tiny_flat, "aggregation.secure": True, "aggregation.threshold": 5})
    with pytest.raises(ConfigError, match="every round would be refused"):
        make_strategy(cfg, "train")


@pytest.mark.parametrize(("extra", "match"), [
    ({"aggregation.threshold": 2}, r"`aggregation.threshold` is 2, below the minimum 3 for degree 4.*"
                                   r"set aggregation.threshold=0 \(picks it\) or >= 3"),
    ({"federation.num-clients": 12, "federation.clients-per-round": 12, "aggregation.degree": 2},
     r"`aggregation.degree` is 2, below the minimum 6 for 12 clients per round.*set aggregation.degree=0"),
])
def test_overrides_below_the_clients_minimum_are_refused_up_front(tiny_flat, extra, match):
    from guardedtuning.errors import ConfigError
    from guardedtuning.server_app.common import make_strategy

    cfg = build_config({**_flat(tiny_flat), **extra})
    with pytest.raises(ConfigError, match=match):
        make_strategy(cfg, "train")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("aggregation.security-bits", 20, r"`aggregation.security-bits` must be an integer in \[40, 256\]"),
    ("aggregation.collusion", 0.1, r"`aggregation.collusion` must be a fraction in \[1/3, 1\)"),
])
def test_a_weaker_security_parameter_than_the_clients_is_refused(tiny_flat, key, value, match):
    from guardedtuning.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        build_config({**_flat(tiny_flat), key: value})


def test_the_default_round_shape_follows_from_the_security_parameter(tiny_flat):
    from guardedtuning.server_app.common import make_strategy

    strategy = make_strategy(build_config(_flat(tiny_flat)), "train")
    params = strategy.round_params(1, [1000, 1001, 1002, 1003, 1004], 64, run_id=1)
    assert (params.degree, params.threshold, params.quorum) == (4, 3, 4)  # 5 clients, 1/3 may collude
    strategy = make_strategy(build_config(_flat(tiny_flat, **{"aggregation.collusion": 0.45})), "train")
    params = strategy.round_params(1, [1000, 1001, 1002, 1003, 1004], 64, run_id=1)
    assert (params.degree, params.threshold, params.quorum) == (4, 4, 4)  # C = 2 would hold t - 1 = 2 at t = 3
