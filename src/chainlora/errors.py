"""Errors chainlora raises for bad input: each carries one line that names the problem and how to fix it."""


class ChainLoRAError(Exception):
    """Base class: a problem the user can fix (bad config, data, model, schedule)."""


class ConfigError(ChainLoRAError, ValueError):
    """A configuration value is invalid."""


class DataError(ChainLoRAError, ValueError):
    """A dataset file, row or field is invalid or missing."""


class ModelNotAvailableError(ChainLoRAError):
    """A model cannot be found or loaded (missing package, bad path)."""


class KnotError(ChainLoRAError):
    """A knot was refused (non-finite or exploding delta, unsupported layer); the model was left unchanged."""


class OutputError(ChainLoRAError):
    """An output cannot be written (a full disk, a quota, an unwritable or blocked path)."""
