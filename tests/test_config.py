from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from guardedtuning.config import (
    RECIPES,
    build_config,
    config_from_recipe,
    default_flat_config,
    load_recipe,
    parse_set,
)
from guardedtuning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_has_a_default_for_every_key():
    with (ROOT / "pyproject.toml").open("rb") as fh:
        app_config = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert app_config == default_flat_config()


def test_defaults_build_and_round_trip():
    cfg = build_config({})
    assert build_config(cfg.flat()) == cfg


def test_the_defaults_are_the_guarded_recipe():
    """No arguments runs GuardedTuning's design point: PrivTune + DP-SGD + secure sparse aggregation."""
    cfg = build_config({})
    assert cfg == config_from_recipe("guarded")
    assert (cfg.recipe, cfg.privacy.mechanism, cfg.dp.enabled, cfg.aggregation.secure) == (
        "guarded", "privtune", True, True)
    for baseline in ("split", "fedlora", "central-ft"):
        base = config_from_recipe(baseline)
        assert (base.privacy.mechanism, base.dp.enabled, base.aggregation.secure) == ("none", False, False)


def test_every_recipe_file_builds():
    for name in RECIPES:
        assert config_from_recipe(name).recipe == name


def test_strings_from_the_command_line_are_coerced():
    cfg = build_config(parse_set(["federation.rounds=4", "lora.top=false", "train.lr=1e-3", "model.name='x'"]))
    assert cfg.federation.rounds == 4 and cfg.lora.top is False and cfg.train.lr == 1e-3
    assert cfg.model.name == "x"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"federation.roundz": 3}, "did you mean federation.rounds"),
        ({"split.layer": 0}, "`split.layer` must be an integer >= 1 but is 0"),
        ({"federation.rounds": "three"}, "`federation.rounds` must be an integer but is 'three'"),
        ({"federation.clients-per-round": 11}, "between 1 and federation.num-clients (10)"),
        ({"data.partition": "skewed"}, "`data.partition` must be `iid` or `dirichlet` but is 'skewed'"),
        ({"lora.top": "maybe"}, "`lora.top` must be true or false"),
        ({"recipe": "nope"}, "`recipe` must be one of"),
        ({"sim.server-device": "tpu"}, "`sim.server-device`"),
        ({"lora.rank": 0}, "`lora.rank` must be a positive integer but is 0"),
    ],
)
def test_bad_values_name_key_value_and_fix(overrides, needle):
    with pytest.raises(ConfigError) as info:
        build_config(overrides)
    assert needle in str(info.value)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available recipes: .*fedlora"):
        load_recipe("no-such-recipe")


def test_set_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_set(["federation.rounds"])
