"""The trilemma sweep: attack columns, seeds, references, rankings, resume; runs on a tiny model."""

from __future__ import annotations

import csv
import json
import math

import pytest

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.errors import ConfigError
from guardedtuning.privacy.attacks.harness import ATTACKS, AttackOptions
from guardedtuning.recipes import config_for
from guardedtuning.server_app.server_app import execute
from guardedtuning.trilemma import (
    ATTACK_COLUMNS,
    CHECK_POINTS,
    COLUMNS,
    DEFAULT_POINT,
    DENSE_REFERENCE,
    SCHEDULES,
    Point,
    Schedule,
    check_ranking,
    compare_rankings,
    computes_default,
    default_points,
    failed_row,
    is_baseline,
    pareto,
    parse_point,
    plot,
    point_config,
    row_of,
    sweep,
    write_table,
)
from tests.conftest import TINY
from tests.local_grid import LocalGrid

BASE = {k: v for k, v in TINY.items() if k != "recipe" and not k.startswith(("privacy.", "dp.", "aggregation."))}
BASE.update({"federation.rounds": 1, "train.local-steps": 3, "data.train-size": 120, "data.test-size": 40})
OPTS = AttackOptions(victim_rows=8, aux_rows=32, aia_rows=60, learned_epochs=1, opt_steps=5,
                     attacks=("eia_nn", "eia_ridge", "aia", "update"))
NOISY = Point("split", {"privacy.mechanism": "dchi", "privacy.eta": 0.5})


def local_runner(cfg):  # the in-process grid: the real ClientApp and drivers, no Ray
    grid = None if cfg.recipe == "central-ft" else LocalGrid(client_app, cfg.federation.num_clients, cfg.flat())
    return execute(cfg, grid)


def record(utility, *, majority=0.5, wall=10.0):
    return {"utility": {"value": utility, "majority_rate": majority}, "privacy": {"epsilon": None},
            "cost": {"bytes_up_per_client_round": 100, "bytes_down_per_client_round": 50, "wall_s": wall}}


def attacks(nn, ridge=None, *, aia=None, update=None):
    tok = {"metric": "token top-1"}
    out = {"eia_nn": {**tok, "asr": nn, "top5": nn, "rouge_l": nn}, "seconds": 4.0}
    if ridge is not None:
        out["eia_ridge"] = {**tok, "asr": ridge}
    if aia is not None:
        out["aia"] = {"metric": "accuracy", "asr": aia, "majority_rate": 0.2}
    if update is not None:
        out["update"] = {"metric": "token-set F1", "asr": update}
    return out


def test_parse_point_and_pareto():
    p = parse_point("privtune:privacy.eta=30,privacy.rho=2")
    assert p.recipe == "privtune" and p.sets == {"privacy.eta": "30", "privacy.rho": "2"}
    assert p.name == "privtune_eta=30_rho=2"
    # (attack success, utility): (0.5, 0.6) is beaten by (0.2, 0.7)
    assert pareto([(0.2, 0.7), (0.5, 0.6), (0.9, 0.9), (0.1, 0.5)]) == [(0.1, 0.5), (0.2, 0.7), (0.9, 0.9)]
    with pytest.raises(ConfigError, match="not key=value"):
        parse_point("split:privacy.eta")


def test_every_harness_attack_is_a_column():
    assert ATTACK_COLUMNS == tuple(ATTACKS)
    assert {"eia_nn_adaptive", "eia_ridge", "eia_nn", "aia", "update_secure"} <= set(ATTACK_COLUMNS)
    assert set(ATTACK_COLUMNS) <= set(COLUMNS) and "eia_max" in COLUMNS


def test_default_points_sweep_the_levers_and_include_the_default():
    pts = default_points()
    names = [p.name for p in pts]
    assert len(set(names)) == len(names)
    assert pts.count(DEFAULT_POINT) == 1 and DENSE_REFERENCE in pts
    assert {"central-ft", "fedlora"} <= {p.recipe for p in pts if is_baseline(p.recipe)}
    design = [p for p in pts if not is_baseline(p.recipe) and p != DENSE_REFERENCE]
    assert len(design) >= 16
    swept = {k for p in design for k in p.sets}
    assert {"privacy.eta", "privacy.clip", "split.release-dim", "split.layer", "dp.target-epsilon",
            "privacy.nopeek-weight", "privacy.rho"} <= swept
    assert any(p.recipe == "privtune" and p.sets.get("privacy.rho") not in (None, 1.0) for p in design)
    assert {"gradfree", "offsite", "privtune", "guarded"} <= {p.recipe for p in design}
    for p in pts:  # every point builds, at every schedule
        for s in SCHEDULES.values():
            point_config(p, s.sets, 0, __import__("pathlib").Path("unused"))


def test_row_of_aggregates_seeds_and_takes_eia_max_over_token_attacks():
    row = row_of(Point("split"), [record(0.70), record(0.60), record(0.80, wall=20.0)],
                 attacks(0.3, 0.45, aia=0.9, update=0.95))
    assert row["seeds"] == 3 and row["utility"] == pytest.approx(0.70)
    assert (row["utility_min"], row["utility_max"]) == (0.60, 0.80)
    assert row["utility_std"] == pytest.approx(0.1)  # sample std of 0.6, 0.7, 0.8
    assert json.loads(row["utility_seeds"]) == [0.7, 0.6, 0.8]
    # AIA accuracy and the update's token-set F1 are not token top-1 rates: eia_max ignores them
    assert row["eia_max"] == 0.45 and row["aia"] == 0.9 and row["update"] == 0.95
    assert row["eia_nn_adaptive"] is None and row["wall_s"] == pytest.approx(40 / 3)
    assert row["default"] is False and row_of(DEFAULT_POINT, [record(0.5)], {})["default"] is True
    one = row_of(Point("split"), [record(0.7)], attacks(0.3))
    assert one["utility_std"] is None and one["utility_min"] == one["utility_max"] == 0.7


def fabricated_rows():
    return [row_of(Point("central-ft"), [record(0.80), record(0.82)], {}),
            row_of(DENSE_REFERENCE, [record(0.70), record(0.72)], attacks(0.99, 0.9, aia=0.9)),
            row_of(DEFAULT_POINT, [record(0.69), record(0.696)], attacks(0.05, 0.08, aia=0.22)),
            row_of(Point("guarded", {"privacy.eta": 9}), [record(0.60), record(0.66)], attacks(0.02, aia=0.21)),
            row_of(Point("guarded", {"privacy.eta": 1}), [record(0.75), record(0.75)], attacks(0.5, aia=0.4))]


def test_table_reference_lines_and_plot_on_fabricated_rows(tmp_path):
    rows = fabricated_rows()
    write_table(rows, tmp_path, about="Schedule test.")
    plot(rows, tmp_path)
    by = {r["point"]: r for r in rows}
    assert by["split"]["drop_vs_split_pts"] == 0.0
    assert by[DEFAULT_POINT.name]["drop_vs_split_pts"] == pytest.approx(100 * (0.71 - 0.693))
    assert by[DEFAULT_POINT.name]["utility_frac_central"] == pytest.approx(0.693 / 0.81)
    md = (tmp_path / "trilemma.md").read_text()
    assert f"**{DEFAULT_POINT.name} (default)**" in md and "0.693 (0.690-0.696)" in md
    assert "attack success 10% at utility 0.677 (split - 3.33 pt)" in md  # 0.71 - 0.0333
    assert "utility >= 0.729 (90% of central-ft)" in md  # 0.9 * 0.81
    # the bound: eia_max <= 10 %, AIA <= majority + 5 pt, utility >= split - 3 pt (0.68)
    assert md.rstrip().endswith(f"met by: {DEFAULT_POINT.name}")
    with (tmp_path / "trilemma.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert [r["default"] for r in got] == ["False", "False", "True", "False", "False"]
    assert (tmp_path / "utility_vs_asr.png").stat().st_size > 10_000


def test_compare_rankings_on_fabricated_rows():
    def rows(u, e):
        return [{"point": n, "utility": a, "eia_max": b} for n, a, b in zip("xyz", u, e, strict=True)]

    same = compare_rankings(rows([0.7, 0.6, 0.5], [0.9, 0.1, 0.0]), rows([0.8, 0.75, 0.5], [0.99, 0.3, 0.01]))
    assert same["agree"] and same["utility"]["fast"] == ["x", "y", "z"] == same["utility"]["full"]
    swapped = compare_rankings(rows([0.6, 0.7, 0.5], [0.9, 0.1, 0.0]), rows([0.8, 0.75, 0.5], [0.99, 0.3, 0.01]))
    assert not swapped["agree"] and not swapped["utility"]["agree"] and swapped["eia_max"]["agree"]
    assert swapped["utility"]["discordant"] == [("x", "y")]
    attack = compare_rankings(rows([0.7, 0.6, 0.5], [0.1, 0.9, 0.0]), rows([0.7, 0.6, 0.5], [0.9, 0.1, 0.0]))
    assert not attack["agree"] and attack["eia_max"]["discordant"] == [("x", "y")]
    tied = compare_rankings(rows([0.7, 0.6, 0.5], [0.9, 0.0, 0.0]), rows([0.7, 0.6, 0.5], [0.9, 0.02, 0.01]))
    assert tied["agree"]  # y = z in one schedule: a tie agrees with either order
    assert not compare_rankings(rows([0.7, 0.6, 0.5], [0.9, 0.1, 0.0]),
                                rows([0.7, 0.6, 0.5], [0.9, 0.07, 0.1]), tie=0.0)["agree"]
    assert compare_rankings(rows([0.7, 0.6, 0.5], [0.9, 0.1, 0.0]),
                            rows([0.7, 0.6, 0.5], [0.9, 0.07, 0.1]), tie=0.05)["agree"]
    assert CHECK_POINTS[0] == DENSE_REFERENCE and DEFAULT_POINT in CHECK_POINTS


def test_sweep_seeds_attacks_once_tables_plots_and_resume(tmp_path):
    points = [Point("central-ft"), Point("split"), NOISY]
    events = []
    rows = sweep(points, BASE, tmp_path, runner=local_runner, attack_options=OPTS, seeds=2,
                 on_event=lambda kind, p, d: events.append((kind, p.name, d.get("seed"))))
    assert [r["point"] for r in rows] == ["central-ft", "split", "split_eta=0.5_mechanism=dchi"]
    assert [e for e in events if e[0] == "run"] == [("run", p.name, s) for p in points for s in (0, 1)]
    assert [e[1] for e in events if e[0] == "attack"] == [p.name for p in points]  # once per point
    central, clean, noisy = rows
    for p, r in zip(points, rows, strict=True):
        us = [json.loads((tmp_path / p.name / f"seed{s}" / "results.json").read_text())["utility"]["value"]
              for s in (0, 1)]
        assert json.loads((tmp_path / p.name / "seed1" / "results.json").read_text())["config"]["seed"] == 1
        assert r["seeds"] == 2 and r["utility"] == pytest.approx(sum(us) / 2)
        assert (r["utility_min"], r["utility_max"]) == (min(us), max(us))
        assert (tmp_path / p.name / "seed0" / "attacks.json").is_file()
        assert not (tmp_path / p.name / "seed1" / "attacks.json").exists()
    assert central["eia_max"] is None and central["utility_frac_central"] == 1.0
    assert clean["bytes_frac_dense"] == 1.0 and clean["drop_vs_split_pts"] == 0.0
    assert clean["eia_max"] == max(clean["eia_nn"], clean["eia_ridge"]) >= 0.9
    assert noisy["eia_max"] < 0.2  # strong noise defeats every token attack that ran
    with (tmp_path / "trilemma.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3
    md = (tmp_path / "trilemma.md").read_text()
    assert "| split | 2 |" in md and "PrivTune reference" in md and "GuardedTuning reference" in md
    assert (tmp_path / "utility_vs_asr.png").stat().st_size > 0 and (tmp_path / "utility_vs_bytes.png").is_file()
    saved = json.loads((tmp_path / "split" / "seed0" / "results.json").read_text())
    assert saved["privacy"]["attacks"]["eia_nn"]["asr"] == clean["eia_nn"]

    def never(cfg):
        raise AssertionError(f"reran {cfg.output.dir}")

    events.clear()  # a rerun reuses every finished (point, seed) and its attacks
    again = sweep(points, BASE, tmp_path, runner=never, attack_options=OPTS, seeds=2,
                  on_event=lambda kind, p, d: events.append((kind, p.name, d.get("seed"))))
    assert [e[0] for e in events if e[0] in ("skip", "run", "attack")] == ["skip"] * 6
    assert [r["utility"] for r in again] == [r["utility"] for r in rows]
    assert [r["eia_max"] for r in again] == [r["eia_max"] for r in rows]

    events.clear()  # one more seed runs only that seed; other attack options re-attack without rerunning
    ran = []
    more = sweep(points[1:2], BASE, tmp_path, runner=lambda cfg: ran.append(cfg.seed) or local_runner(cfg),
                 attack_options=AttackOptions(victim_rows=4, aux_rows=32, aia_rows=60, attacks=("eia_nn",)),
                 seeds=3, on_event=lambda kind, p, d: events.append((kind, p.name, d.get("seed"))))
    assert ran == [2] and more[0]["seeds"] == 3 and [e[0] for e in events].count("attack") == 1
    assert more[0]["eia_ridge"] is None and more[0]["eia_nn"] is not None

    with pytest.raises(ConfigError, match=r"train.local-steps=3 \(this sweep: 4\)"):  # a changed config is refused
        sweep(points[1:2], {**BASE, "train.local-steps": 4}, tmp_path, runner=never, attack_options=OPTS)


@pytest.mark.e2e  # 4 tiny trainings; the ranking logic itself is tested on fabricated rows above
def test_check_ranking_runs_both_schedules_and_writes_the_report(tmp_path):
    small = AttackOptions(victim_rows=8, aux_rows=32, aia_rows=60, attacks=("eia_nn",))
    schedules = {"fast": Schedule("fast", {"train.local-steps": 2}, small, "test"),
                 "full": Schedule("full", {"train.local-steps": 4}, small, "test")}
    base = {k: v for k, v in BASE.items() if k != "train.local-steps"}  # a --set would override the schedule's
    result = check_ranking(tmp_path, base, points=(Point("split"), NOISY), runner=local_runner, schedules=schedules)
    for name, steps in (("fast", 2), ("full", 4)):
        cfg = json.loads((tmp_path / name / "split" / "seed0" / "results.json").read_text())["config"]
        assert cfg["train.local-steps"] == steps
    saved = json.loads((tmp_path / "ranking_check.json").read_text())
    assert saved["agree"] == result["agree"] == (result["utility"]["agree"] and result["eia_max"]["agree"])
    # the report is compare_rankings over the two sweeps' own rows
    rows = {n: list(csv.DictReader((tmp_path / n / "trilemma.csv").open())) for n in ("fast", "full")}
    for key in ("utility", "eia_max"):
        for n in ("fast", "full"):
            vals = {r["point"]: float(r[key]) for r in rows[n]}
            assert {p: v[n] for p, v in result[key]["values"].items()} == pytest.approx(vals)
            assert result[key][n] == sorted(vals, key=lambda p: -vals[p])
    assert "Does `fast` rank the check points as `full` does?" in (tmp_path / "ranking_check.md").read_text()
    assert not math.isnan(result["eia_max"]["values"]["split"]["full"])


def test_cli_refuses_bad_arguments_before_anything_runs(tmp_path, capsys):
    from guardedtuning.cli import main

    out = str(tmp_path / "sweep")
    assert main(["trilemma", "--seeds", "0", "--out", out]) == 2
    assert "--seeds 0 is below 1; pass --seeds 3" in capsys.readouterr().err
    assert main(["trilemma", "--point", "split:privacy.etaa=3", "--out", out]) == 2
    assert "privacy.etaa" in capsys.readouterr().err
    assert main(["trilemma", "--schedule", "fast", "--point", "guarded", "--set", "seed=x", "--out", out]) == 2
    assert "--set seed='x' is not an integer" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_fast_schedule_is_a_reduction_of_full_with_every_attack():
    fast, full = SCHEDULES["fast"], SCHEDULES["full"]
    assert fast.attacks.attacks == full.attacks.attacks == tuple(ATTACKS)
    assert fast.attacks.noise_levels == full.attacks.noise_levels  # noise-aware training kept
    for name in ("victim_rows", "aux_rows", "aia_rows", "learned_epochs", "opt_steps", "opt_candidates",
                 "adaptive_k", "adaptive_sweeps", "ridge_passes"):
        assert getattr(fast.attacks, name) <= getattr(full.attacks, name), name
    cfg_fast, cfg_full = (point_config(DEFAULT_POINT, s.sets, 0, __import__("pathlib").Path("x")) for s in (fast, full))
    steps = [c.federation.rounds * c.train.local_steps for c in (cfg_fast, cfg_full)]
    assert steps[0] < steps[1] and cfg_fast.data == cfg_full.data and cfg_fast.federation.num_clients == 10


def test_a_recipe_without_attack_surface_is_skipped_and_a_failing_attack_does_not_stop_the_sweep(tmp_path,
                                                                                                   monkeypatch):
    import guardedtuning.privacy.attacks.harness as harness
    from guardedtuning.errors import MessageError
    from guardedtuning.trilemma import _attack

    calls = []

    def failing(cfg, run_dir, opts, log=None, *, surface):
        calls.append(cfg.recipe)
        raise MessageError("checkpoint: adapter tensors do not match this model")

    monkeypatch.setattr(harness, "attack_run", failing)
    opts = AttackOptions()
    fed = _attack(Point("fedlora"), point_config(Point("fedlora"), BASE, 0, tmp_path / "f"), tmp_path / "f", opts,
                  lambda *_a: None)
    assert calls == [] and all(fed[a] is None for a in opts.attacks) and "attack_surface" in fed["skipped"]
    out = _attack(Point("split"), point_config(Point("split"), BASE, 0, tmp_path / "s"), tmp_path / "s", opts,
                  lambda *_a: None)
    assert calls == ["split"] and "adapter tensors do not match" in out["skipped"] and out["failed"]


def test_a_point_whose_run_fails_is_recorded_and_the_sweep_goes_on(tmp_path):
    from guardedtuning.errors import GuardedTuningError

    def runner(cfg):
        if cfg.train.lr == 0.004:
            raise GuardedTuningError("round 3: every sampled client has spent its privacy budget")
        return execute(cfg, LocalGrid(client_app, cfg.federation.num_clients, cfg.flat()))

    pts = [Point("split", {"train.lr": 0.004}), Point("split")]
    rows = sweep(pts, BASE, tmp_path, runner=runner, attack_options=AttackOptions(attacks=()))
    assert rows[0]["utility"] is None and "spent its privacy budget" in rows[0]["skipped"]
    assert rows[1]["utility"] is not None
    assert "spent its privacy budget" in (tmp_path / "trilemma.csv").read_text()


def test_the_default_mark_follows_what_is_computed_not_the_points_name():
    """A sweep run with ``--set train.lr=...`` under every point moves ``guarded`` off the default: the
    point that sets the default's learning rate back is the one ``guardedtuning run`` computes."""
    sched = {"federation.rounds": 3, "train.local-steps": 10}
    lr = config_for(DEFAULT_POINT.recipe, {}).train.lr
    moved = {**sched, "train.lr": lr / 2}
    back = Point(DEFAULT_POINT.recipe, {"train.lr": lr})
    assert computes_default(DEFAULT_POINT, sched, sched, 0)
    assert not computes_default(DEFAULT_POINT, moved, sched, 0)
    assert computes_default(back, moved, sched, 0)
    assert not computes_default(Point("split"), sched, sched, 0)
    rec = {"utility": {"value": 0.5, "majority_rate": 0.4}, "privacy": {}, "cost": {}}
    assert row_of(DEFAULT_POINT, [rec], {}, False)["default"] is False
    assert row_of(back, [rec], {}, True)["default"] is True
    assert failed_row(back, True)["default"] is True
