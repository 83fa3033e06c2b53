"""A record that stopped for its DP budget must not look finished (issue 17 review, item 4)."""

from __future__ import annotations

import json

import pytest

from guardedtuning import cli, trilemma
from guardedtuning.errors import ConfigError
from guardedtuning.recipes import build_config

STOPPED = {"after_round": 1, "reason": "privacy budget spent", "message": "round 2: every sampled client ..."}


def record(cfg, **extra):
    return {"recipe": cfg.recipe, "model": "m", "dataset": "d", "config": cfg.flat(),
            "utility": {"metric": "accuracy", "value": 0.5, "majority_rate": 0.5},
            "cost": {"bytes_up_per_client_round": 0, "step_overhead_s_median": None, "wall_s": 1.0},
            "history": [{"round": 1, "utility": 0.5}], **extra}


def test_the_summary_says_the_run_stopped(tmp_path, monkeypatch):
    cfg = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), "federation.rounds": 3})
    (tmp_path / "results.json").write_text(json.dumps(record(cfg, stopped=STOPPED)))
    lines = []
    monkeypatch.setattr(cli.console, "print", lambda *a, **_k: lines.append(" ".join(map(str, a))))
    cli._summary(tmp_path)
    (line,) = [x for x in lines if "stopped" in x]
    assert "after round 1 of 3" in line and "privacy budget spent" in line


def test_a_sweep_refuses_a_stopped_point_naming_the_fix(tmp_path):
    cfg = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), "federation.rounds": 3})
    (tmp_path / "results.json").write_text(json.dumps(record(cfg, stopped=STOPPED)))
    with pytest.raises(ConfigError) as info:
        trilemma._finished(tmp_path, cfg)
    text = str(info.value)
    assert "stopped after round 1 of 3" in text and "privacy budget spent" in text and "--out" in text


def test_a_sweep_takes_a_finished_point(tmp_path):
    cfg = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), "federation.rounds": 3})
    (tmp_path / "results.json").write_text(json.dumps(record(cfg)))
    assert trilemma._finished(tmp_path, cfg)["history"]
