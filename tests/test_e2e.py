"""End-to-end: `guardedtuning run` on Flower's simulation engine (SuperLink + Ray), tiny model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from guardedtuning.launcher import FLWR_ENV, processes_with_env, toml_value
from guardedtuning.recipes._split_family import BASELINE
from tests.test_drivers import check_contract

pytestmark = pytest.mark.e2e

TINY_CFG = {"recipe": "split", **BASELINE,  # the guarded knobs off, the full cut (tiny-bert: 4 blocks)
            "model.name": "tiny-bert", "model.max-length": 32, "data.train-size": 240, "data.test-size": 60,
            "federation.num-clients": 3, "federation.clients-per-round": 3, "federation.rounds": 2,
            "train.local-steps": 8, "train.batch-size": 8, "train.lr": 5e-3, "train.server-lr": 5e-3}
# for `guardedtuning run --recipe X`: only the sizes (and a cut tiny-bert's 4 blocks allow); the recipe
# file sets its own privacy knobs
SIZES = ("model.", "data.", "federation.", "train.", "split.layer")
TINY = [f"{k}={v}" for k, v in TINY_CFG.items() if k.startswith(SIZES)]


def _processes_using(flwr_home: Path) -> list[int]:
    """PIDs of live processes whose FLWR_HOME is ``flwr_home`` (what the run started)."""
    return processes_with_env("FLWR_HOME", str(flwr_home))


@pytest.mark.parametrize("recipe", ["split", "fedlora", "guarded"])
def test_run_on_the_simulation_engine(tmp_path, recipe):
    out = tmp_path / recipe
    args = [sys.executable, "-m", "guardedtuning.cli", "run", "--recipe", recipe, "--out", str(out)]
    for s in TINY + (["privacy.noise-seed=7"] if recipe == "guarded" else []):  # reproducible noise
        args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    check_contract(record)
    assert record["schema"] == "guardedtuning.results/v1" and record["recipe"] == recipe
    losses = [r["train_loss"] for r in record["history"]]
    # the default's noise (a clipped 4-dim release at eta 2, DP-SGD) needs more than 2 rounds to move a random
    # tiny model's loss: learning is checked on split and fedlora, the default's utility in docs/
    assert len(losses) == 2 and (losses[1] < losses[0] if recipe != "guarded" else all(map(math.isfinite, losses)))
    assert record["cost"]["bytes_up_per_client_round"] > 0 and record["cost"]["wall_s"] > 0
    assert (out / "utility.png").stat().st_size > 0
    if recipe == "guarded":  # noise, DP-SGD and secure aggregation through the real engine
        assert record["privacy"]["epsilon"] is not None and record["privacy"]["mechanism"]["name"] == "dchi"
        assert record["cost"]["rejected_replies"] == 0
    assert "round 2:" in res.stdout
    left = _processes_using(out / ".flwr")
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]


def test_central_ft_runs_in_process(tmp_path):
    out = tmp_path / "central"
    args = [sys.executable, "-m", "guardedtuning.cli", "run", "--recipe", "central-ft", "--out", str(out)]
    for s in TINY:
        args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["num_clients"] is None and record["cost"]["bytes_up_per_client_round"] is None
    assert record["history"][-1]["train_loss"] < record["history"][0]["train_loss"]


def _flwr_run_local(tmp_path: Path, flat: dict, *, supernodes: int) -> dict:
    """`flwr run . local --stream` with ``flat`` as run config (Flower starts a local SuperLink, which we
    stop by PID); the run's record."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(home)}
    repo = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", ".", "local", "--stream", "--federation-config",
           f"num-supernodes={supernodes}", "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in flat.items())]
    try:
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for pid in processes_with_env("FLWR_HOME", str(home)):  # the SuperLink flwr left running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads((Path(flat["output.dir"]) / "results.json").read_text())


def test_flwr_run_dot_as_the_readme_says(tmp_path):
    """The README's `flwr run . local ...` (Flower starts its own local SuperLink, which we stop)."""
    from guardedtuning.config import build_config, default_flat_config

    out = tmp_path / "run"
    flat = {**TINY_CFG, "output.dir": str(out)}
    record = _flwr_run_local(tmp_path, flat, supernodes=3)
    assert record["config"] == {**default_flat_config(), **build_config(flat).flat()}
    assert len(record["history"]) == 2


def test_flwr_run_dot_uses_the_same_defaults(tmp_path):
    """`flwr run .` with only a few overrides: every other key comes from pyproject.toml."""
    from guardedtuning.config import build_config, default_flat_config
    from guardedtuning.launcher import FlowerRun

    out = tmp_path / "flwr"
    flat = {**TINY_CFG, "output.dir": str(out)}
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in flat.items())
    run = FlowerRun(build_config(flat), out)
    out.mkdir()
    try:
        run.start(run_config=overrides)
        assert run.flwr is not None
        run.flwr.wait(timeout=600)
    finally:
        run.stop()
    record = json.loads((out / "results.json").read_text())
    expected = {**default_flat_config(), **build_config(flat).flat()}
    assert record["config"] == expected
    assert record["config"]["federation.rounds"] == 2 and record["config"]["lora.rank"] == 8
    left = _processes_using(out / ".flwr")
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]


def test_flwr_run_dot_with_flowers_default_two_supernodes(tmp_path):
    """`flwr run . local --stream` on Flower's default local federation (2 SuperNodes) with the guarded
    default's knobs (low-dim d_chi release, DP-SGD, secure aggregation): a 3-per-round run samples both,
    with a warning."""
    out = tmp_path / "run"
    sizes = {k: v for k, v in TINY_CFG.items() if k.startswith(SIZES)}
    flat = {**sizes, "federation.rounds": 1, "train.local-steps": 3, "privacy.noise-seed": 7, "output.dir": str(out)}
    record = _flwr_run_local(tmp_path, flat, supernodes=2)
    assert record["recipe"] == "guarded" and len(record["history"]) == 1
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [len(e["clients"]) for e in events if e["event"] == "round_start"] == [2]
    assert any("each round samples 2" in e.get("message", "") for e in events if e["event"] == "warning")
    assert not [e for e in events if e["event"] == "refused"]
