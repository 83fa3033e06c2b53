"""guardedtuning.bench reads a run's record: a run that stopped early is not taken as a finished point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardedtuning.bench import summarize


def record(rounds: int, **extra) -> dict:
    hist = [{"round": r, "wall_s": 10.0 * r, "bytes_up": 100, "bytes_down": 50} for r in range(1, rounds + 1)]
    return {"num_clients": 10, "clients_per_round": 5, "rounds": 3, "history": hist,
            "utility": {"metric": "accuracy", "value": 0.5}, "cost": {"wall_s": 10.0 * rounds}, **extra}


def test_a_finished_record_gives_its_round_time(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(record(3)))
    row = summarize(tmp_path)
    assert row["rounds"] == 3 and row["round_s"] == 10.0 and row["bytes_per_round"] == 150


def test_a_stopped_record_is_refused_with_its_reason(tmp_path: Path) -> None:
    stop = {"after_round": 2, "reason": "privacy budget spent", "message": "raise dp.max-participations"}
    (tmp_path / "results.json").write_text(json.dumps(record(2, stopped=stop)))
    with pytest.raises(RuntimeError, match="stopped after round 2 of 3 \\(privacy budget spent\\)"):
        summarize(tmp_path)
