"""The run configuration: one frozen, validated object built from a flat run config.

- :mod:`.fields`: field helpers (defaults with help, errors naming key, value and fix);
- :mod:`.sections`: the core sections (model, split, lora, data, federation, ...);
- :mod:`.privacy`: the client-side privacy sections (``privacy.*``, ``dp.*``);
- :mod:`.run`: :class:`RunConfig`, :func:`build_config`, recipes and command-line parsing.
"""

from guardedtuning.config.fields import Scalar, fail, opt
from guardedtuning.config.privacy import DPConfig, PrivacyConfig
from guardedtuning.config.run import (
    FIELD_TYPES,
    PACKAGE_DIR,
    RECIPES,
    SECTIONS,
    SPLIT_RECIPES,
    RunConfig,
    build_config,
    config_from_recipe,
    config_help,
    default_flat_config,
    load_recipe,
    parse_set,
    recipe_dir,
    recipe_path,
    unknown_key_error,
)
from guardedtuning.config.sections import (
    AggregationConfig,
    CentralConfig,
    CommConfig,
    DataConfig,
    EvalConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    SimConfig,
    SplitConfig,
    TrainConfig,
)

__all__ = [
    "FIELD_TYPES", "PACKAGE_DIR", "RECIPES", "SECTIONS", "SPLIT_RECIPES", "DPConfig", "PrivacyConfig", "AggregationConfig", "CentralConfig", "CommConfig",
    "DataConfig", "EvalConfig", "FederationConfig", "LoraConfig", "ModelConfig", "OutputConfig", "RunConfig",
    "Scalar", "SimConfig", "SplitConfig", "TrainConfig", "build_config", "config_from_recipe", "config_help",
    "default_flat_config", "fail", "load_recipe", "opt", "parse_set", "recipe_dir", "recipe_path",
    "unknown_key_error",
]
