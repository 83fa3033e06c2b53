from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from guardedtuning import recipes
from guardedtuning.config import default_flat_config, parse_set
from guardedtuning.errors import ConfigError
from guardedtuning.recipes import build_config
from guardedtuning.recipes import config_for as config_from_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_has_a_default_for_every_key():
    with (ROOT / "pyproject.toml").open("rb") as fh:
        app_config = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert app_config == default_flat_config()


def test_defaults_build_and_round_trip():
    cfg = build_config({})
    assert build_config(cfg.flat()) == cfg


def test_the_defaults_are_the_guarded_recipe():
    """No arguments runs GuardedTuning's design point: a 4-dim d_chi release + DP-SGD + secure aggregation."""
    cfg = build_config({})
    assert cfg == config_from_recipe("guarded")
    assert (cfg.recipe, cfg.privacy.mechanism, cfg.dp.enabled, cfg.aggregation.secure) == (
        "guarded", "dchi", True, True)
    assert (cfg.split.layer, cfg.split.release_dim, cfg.privacy.eta, cfg.privacy.clip) == (4, 4, 2.0, 1.0)
    for baseline in ("split", "fedlora", "central-ft"):
        base = config_from_recipe(baseline)
        assert (base.privacy.mechanism, base.dp.enabled, base.aggregation.secure) == ("none", False, False)


def test_every_recipe_builds():
    for name in recipes.names():
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
        ({"recipe": "nope"}, "unknown recipe 'nope'; available recipes: central-ft, fedlora"),
        ({"recipe": "no such"}, "`recipe` must be a recipe name"),
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
        config_from_recipe("no-such-recipe")


def test_set_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_set(["federation.rounds"])


@pytest.mark.parametrize(
    ("recipe", "overrides", "needle"),
    [
        ("fedlora", {"privacy.mechanism": "dchi"}, "recipe 'fedlora' releases no activations"),
        ("offsite", {"privacy.quantize-bits": 8}, "recipe 'offsite' releases no activations"),
        ("gradfree", {"privacy.nopeek-weight": 0.1}, "recipe 'gradfree' trains no client bottom"),
        ("central-ft", {"dp.enabled": True}, "recipe 'central-ft' has no client-side training"),
        ("fedlora", {"dp.enabled": True}, "--set dp.enabled=false"),
        ("split", {"aggregation.secure": True, "federation.clients-per-round": 1}, "one client has no one to hide"),
    ],
)
def test_each_recipe_refuses_the_knobs_it_cannot_honour(recipe, overrides, needle):
    with pytest.raises(ConfigError) as info:
        config_from_recipe(recipe, overrides)
    assert needle in str(info.value)


def test_knobs_a_recipe_honours_pass():
    assert config_from_recipe("gradfree", {"privacy.mechanism": "dchi"}).privacy.mechanism == "dchi"
    assert config_from_recipe("central-ft", {"aggregation.secure": True, "federation.clients-per-round": 1})
