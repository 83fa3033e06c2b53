"""The run configuration: one frozen, validated object built from a flat run config.

- :mod:`.fields`: field helpers (defaults with help, errors naming key, value and fix);
- :mod:`.sections`: the core sections (model, split, lora, data, federation, ...);
- :mod:`.privacy`: the client-side privacy sections (``privacy.*``, ``dp.*``);
- :mod:`.run`: :class:`RunConfig`, :func:`build_config` (structural checks; each recipe's own
  checks are in :func:`guardedtuning.recipes.build_config`) and command-line parsing.
"""

from guardedtuning.config.fields import Scalar, fail, opt
from guardedtuning.config.privacy import DPConfig, PrivacyConfig
from guardedtuning.config.run import (
    FIELD_TYPES,
    PACKAGE_DIR,
    SECTIONS,
    RunConfig,
    build_config,
    config_help,
    default_flat_config,
    parse_set,
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
    "FIELD_TYPES", "PACKAGE_DIR", "SECTIONS", "DPConfig", "PrivacyConfig", "AggregationConfig", "CentralConfig", "CommConfig",
    "DataConfig", "EvalConfig", "FederationConfig", "LoraConfig", "ModelConfig", "OutputConfig", "RunConfig",
    "Scalar", "SimConfig", "SplitConfig", "TrainConfig", "build_config", "config_help",
    "default_flat_config", "fail", "opt", "parse_set",
    "unknown_key_error",
]
