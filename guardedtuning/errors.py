"""User-facing errors.

Every error a user can cause by what they pass in (config, model path, data file, a
client's reply) derives from :class:`GuardedTuningError`. Its message names the input,
the bad value and the fix, in one line; the CLI prints it without a traceback.
"""

from __future__ import annotations


class GuardedTuningError(Exception):
    """Base class for errors caused by bad input; printed as one line by the CLI."""


class ConfigError(GuardedTuningError, ValueError):
    """A run-config key is unknown or its value is not allowed."""


class ModelLoadError(GuardedTuningError):
    """A model name, folder or hub id cannot be resolved or loaded."""


class DataError(GuardedTuningError):
    """A dataset cannot be loaded or lacks what the task needs."""


class MessageError(GuardedTuningError):
    """A message between ServerApp and ClientApp lacks a record or holds bad values."""


class ClientsFailed(GuardedTuningError):
    """Every client of a round failed; the message carries the first client's reason."""


class BudgetSpent(ClientsFailed):
    """Every sampled client of a round has spent its DP-SGD budget: no round can be trained any more."""
