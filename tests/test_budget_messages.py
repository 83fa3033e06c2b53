"""What a run that cannot go on for its clients' DP budgets says (issue 17 review, items 3 and 14)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from guardedtuning.config import build_config
from guardedtuning.errors import BudgetSpent, ClientsFailed
from guardedtuning.results import Recorder
from guardedtuning.server_app.engine import Round


def a_round(tmp_path, number: int = 3):
    cfg = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), "dp.enabled": True,
                        "federation.rounds": 4, "train.local-steps": 5, "dp.target-epsilon": 6.0})
    rec = Recorder(cfg, tmp_path, model="m", dataset="d")
    rec.privacy_ledger.request(9, 1, 5)
    rec.privacy_ledger.note(9, {"dp_noise_multiplier": 1.1, "dp_sample_rate": 0.1, "dp_delta": 1e-5,
                                "dp_steps": 5, "dp_epsilon": 2.5, "dp_epsilon_model": 1.25})
    return SimpleNamespace(number=number, run=SimpleNamespace(cfg=cfg, rec=rec))


def test_every_client_spent_names_the_cap_the_epsilon_so_far_and_a_new_output_dir(tmp_path):
    with pytest.raises(BudgetSpent) as info:
        Round.give_up_if_nobody(a_round(tmp_path), 0, {}, [9, 10])
    text = str(info.value)
    assert "dp.max-participations = federation.rounds x train.local-steps (= 20)" in text
    assert "epsilon so far: 2.500 of dp.target-epsilon 6.0" in text
    assert "new output.dir" in text and "add up" in text
    assert "more dp.target-epsilon" not in text and "fewer rounds" not in text


def test_one_timed_out_and_the_rest_spent_says_both(tmp_path):
    with pytest.raises(ClientsFailed) as info:
        Round.give_up_if_nobody(a_round(tmp_path), 0, {4: "no reply before comm.timeout"}, [9, 10])
    text = str(info.value)
    assert "first reason: no reply before comm.timeout" in text
    assert "2 more had spent their privacy budget (dp.target-epsilon 6.0)" in text
