"""The trilemma sweep on a tiny model: runs, attacks, table, plots, resume."""

from __future__ import annotations

import csv
import json

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.privacy.attacks.harness import AttackOptions
from guardedtuning.server_app.server_app import execute
from guardedtuning.trilemma import Point, pareto, parse_point, sweep
from tests.conftest import TINY
from tests.local_grid import LocalGrid

BASE = {k: v for k, v in TINY.items() if k != "recipe" and not k.startswith(("privacy.", "dp.", "aggregation."))}
BASE.update({"federation.rounds": 1, "train.local-steps": 3, "data.train-size": 120, "data.test-size": 40})
OPTS = AttackOptions(victim_rows=8, aux_rows=32, aia_rows=60, learned_epochs=1, opt_steps=5,
                     attacks=("eia_nn", "eia_mlp", "aia", "update"))


def local_runner(cfg):  # the in-process grid: the real ClientApp and drivers, no Ray
    grid = None if cfg.recipe == "central-ft" else LocalGrid(client_app, cfg.federation.num_clients, cfg.flat())
    return execute(cfg, grid)


def test_parse_point_and_pareto():
    p = parse_point("privtune:privacy.eta=30,privacy.rho=2")
    assert p.recipe == "privtune" and p.sets == {"privacy.eta": "30", "privacy.rho": "2"}
    assert p.name == "privtune_eta=30_rho=2"
    # (attack success, utility): (0.5, 0.6) is beaten by (0.2, 0.7)
    assert pareto([(0.2, 0.7), (0.5, 0.6), (0.9, 0.9), (0.1, 0.5)]) == [(0.1, 0.5), (0.2, 0.7), (0.9, 0.9)]


def test_small_sweep_tables_plots_and_resume(tmp_path):
    points = [Point("central-ft"), Point("split"), Point("split", {"privacy.mechanism": "dchi", "privacy.eta": 0.5})]
    events = []
    rows = sweep(points, BASE, tmp_path, runner=local_runner, attack_options=OPTS,
                 on_event=lambda kind, p, d: events.append((kind, p.name)))
    assert [r["point"] for r in rows] == ["central-ft", "split", "split_eta=0.5_mechanism=dchi"]
    central, clean, noisy = rows
    assert central["eia_nn"] is None and central["utility_frac_central"] == 1.0
    assert clean["bytes_frac_dense"] == 1.0 and noisy["bytes_per_client_round"] > 0
    assert clean["eia_nn"] >= 0.9 and noisy["eia_nn"] < 0.2  # strong noise defeats the attack
    with (tmp_path / "trilemma.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert "| split |" in (tmp_path / "trilemma.md").read_text()
    assert (tmp_path / "utility_vs_asr.png").stat().st_size > 0 and (tmp_path / "utility_vs_bytes.png").is_file()
    record = json.loads((tmp_path / "split" / "results.json").read_text())
    assert record["privacy"]["attacks"]["eia_nn"]["asr"] == clean["eia_nn"]
    # a rerun reuses every finished point
    events.clear()
    again = sweep(points, BASE, tmp_path, runner=lambda cfg: (_ for _ in ()).throw(AssertionError("reran")),
                  attack_options=OPTS, on_event=lambda kind, p, d: events.append((kind, p.name)))
    assert [k for k, _ in events if k in ("skip", "run")] == ["skip"] * 3
    assert [r["eia_nn"] for r in again] == [r["eia_nn"] for r in rows]
