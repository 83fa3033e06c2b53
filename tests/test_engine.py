"""The round engine against the real ClientApp, in process: fewer clients than a round asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.errors import ClientsFailed
from guardedtuning.recipes import build_config
from guardedtuning.server_app import common
from guardedtuning.server_app.server_app import execute
from tests.local_grid import LocalGrid


def _events(out: str, kind: str) -> list[dict]:
    lines = (Path(out) / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.mark.parametrize("secure", [False, True])
def test_fewer_connected_clients_than_a_round_asks_for_run_with_a_warning(tiny_flat, monkeypatch, secure):
    """Flower's default local federation has 2 SuperNodes; a 3-per-round run samples both, with a warning."""
    monkeypatch.setattr(common, "SETTLE_S", 0.3)
    cfg = build_config({**tiny_flat, "federation.rounds": 1, "train.local-steps": 2, "aggregation.secure": secure})
    record = execute(cfg, LocalGrid(client_app, 2, cfg.flat()))
    starts = _events(cfg.output.dir, "round_start")
    assert [len(e["clients"]) for e in starts] == [2]
    warnings = [e["message"] for e in _events(cfg.output.dir, "warning")]
    assert any("2 clients connected, federation.clients-per-round is 3" in w for w in warnings)
    assert record["history"][0]["utility"] is not None and not _events(cfg.output.dir, "refused")


def test_too_few_clients_for_secure_aggregation_stop_with_the_reason(tiny_flat, monkeypatch):
    monkeypatch.setattr(common, "SETTLE_S", 0.1)
    cfg = build_config({**tiny_flat, "aggregation.secure": True, "comm.timeout": 0.5})
    with pytest.raises(ClientsFailed, match="only 1 clients connected .* needs at least 2"):
        execute(cfg, LocalGrid(client_app, 1, cfg.flat()))
