"""The harness attacks what gradfree and offsite clients send, on tiny runs (in process, no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from guardedtuning import recipes
from guardedtuning.clients.client_app import app as client_app
from guardedtuning.privacy.attacks.harness import RELEASE_ATTACKS, UPDATE_ATTACKS, AttackOptions, attack_run
from guardedtuning.recipes import build_config
from guardedtuning.server_app.server_app import execute
from tests.local_grid import LocalGrid

OPTS = AttackOptions(victim_rows=8, aux_rows=32, aia_rows=60, learned_epochs=1, opt_steps=5, adaptive_k=4,
                     ridge_passes=1, secure_clients=3)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDEDTUNING_CACHE", str(tmp_path / "cache"))


def _run(flat):
    cfg = build_config(flat)
    execute(cfg, LocalGrid(client_app, cfg.federation.num_clients, cfg.flat()))
    return cfg


def _small(tiny_flat, **extra):
    return {**tiny_flat, "federation.rounds": 1, "train.local-steps": 2, "data.train-size": 90,
            "data.test-size": 40, **extra}


def _ran(result):
    return isinstance(result, dict) and math.isfinite(result["asr"]) and result["seconds"] >= 0


def test_every_release_attack_runs_on_a_gradfree_run(tiny_flat):
    cfg = _run(_small(tiny_flat, recipe="gradfree", **{"gradfree.adapter-dim": 16}))
    out = attack_run(cfg, Path(cfg.output.dir), OPTS, surface=recipes.get(cfg.recipe).attack_surface)
    assert all(_ran(out[a]) for a in RELEASE_ATTACKS), {a: out[a] for a in RELEASE_ATTACKS}
    assert all(out[a] is None for a in UPDATE_ATTACKS) and "gradfree's update" in out["skipped"]
    # nothing protects the frozen bottom's releases here: the attacks read them
    assert out["eia_nn"]["asr"] >= 0.9 and out["eia_nn_adaptive"]["asr"] >= 0.9


def test_every_update_attack_runs_on_an_offsite_run_with_its_dp_plan(tiny_flat):
    flat = _small(tiny_flat, recipe="offsite", **{"offsite.emulator-layers": 1, "dp.enabled": True,
                                                   "aggregation.secure": True})
    cfg = _run(flat)
    out = attack_run(cfg, Path(cfg.output.dir), OPTS, surface=recipes.get(cfg.recipe).attack_surface)
    assert all(_ran(out[a]) for a in UPDATE_ATTACKS), {a: out[a] for a in UPDATE_ATTACKS}
    assert all(out[a] is None for a in RELEASE_ATTACKS) and "offsite releases no activations" in out["skipped"]
    alone, summed = out["update"], out["update_secure"]
    assert alone["dp"] and alone["dp_noise_multiplier"] > 0 and alone["local_steps"] == 2
    assert alone["rows_attacked"] > 0 and summed["clients_in_sum"] == 3 and summed["secure_aggregation"]
    recorded = alone["dp_noise_multiplier_recorded"]
    assert recorded is None or alone["dp_noise_multiplier"] == pytest.approx(recorded)


def test_a_fedlora_run_is_not_read_as_offsite_and_every_attack_says_why_it_was_skipped(tiny_flat):
    """Regression: fedlora's checkpoint also holds "global", which the harness read as offsite's sandwich adapters
    (the sweep died there); the recipe's declared attack surface (none) now decides."""
    cfg = _run(_small(tiny_flat, recipe="fedlora"))
    assert recipes.get("fedlora").attack_surface == ()
    out = attack_run(cfg, Path(cfg.output.dir), OPTS, surface=recipes.get(cfg.recipe).attack_surface)
    assert all(out[a] is None for a in (*RELEASE_ATTACKS, *UPDATE_ATTACKS))
    assert all(f"{a}: not on the attack surface" in out["skipped"] for a in (*RELEASE_ATTACKS, *UPDATE_ATTACKS))
