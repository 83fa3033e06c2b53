"""A resumed run with another plan on the same output.dir must not start a fresh privacy ledger
(issue 17 review, item 3): the earlier attempt's releases of the same clients' data would go uncounted."""

from __future__ import annotations

import json

import pytest

from guardedtuning.errors import ConfigError
from guardedtuning.recipes import build_config
from guardedtuning.results import LEDGER_FILE, Recorder, config_digest


def charged(tmp_path, **overrides):
    cfg = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), **overrides})
    rec = Recorder(cfg, tmp_path, model="m", dataset="d")
    rec.privacy_ledger.request(3, 1, 20)
    rec.save_privacy_ledger()
    return cfg


def test_a_changed_plan_on_a_charged_ledger_is_refused_naming_both_digests(tmp_path):
    old = charged(tmp_path)
    new = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), "dp.target-epsilon": 20.0})
    with pytest.raises(ConfigError) as info:
        Recorder(new, tmp_path, model="m", dataset="d").load_privacy_ledger()
    text = str(info.value)
    assert config_digest(old) in text and config_digest(new) in text
    assert "output.dir" in text and str(tmp_path / LEDGER_FILE) in text


def test_a_changed_plan_on_an_empty_ledger_starts_a_new_one(tmp_path):
    (tmp_path / LEDGER_FILE).write_text(json.dumps({"digest": "0" * 16, "nodes": {}}))
    new = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), "dp.target-epsilon": 20.0})
    rec = Recorder(new, tmp_path, model="m", dataset="d")
    rec.load_privacy_ledger()
    assert rec.privacy_ledger.steps(3) == 0


def test_a_run_that_does_not_resume_keeps_the_earlier_charged_ledger_on_disk(tmp_path):
    charged(tmp_path)
    before = (tmp_path / LEDGER_FILE).read_text()
    cfg = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), "output.resume": False})
    rec = Recorder(cfg, tmp_path, model="m", dataset="d")
    rec.load_privacy_ledger()
    assert rec.privacy_ledger.steps(3) == 0  # a new run: a new ledger ...
    rec.save_privacy_ledger()
    kept = sorted(tmp_path.glob("privacy-ledger.earlier-*.json"))
    assert [p.read_text() for p in kept] == [before]  # ... and the earlier charges are not overwritten
