"""Exceptions of trojanguard: every message names the argument or file, what was expected and what came; and the
two argument checks every constructor uses, so their messages read the same everywhere."""

from numbers import Integral


class TrojanGuardError(Exception):
    """Base class of every error trojanguard raises on purpose."""


class DataError(TrojanGuardError, ValueError):
    """Input data is missing, empty, corrupt or of the wrong shape, dtype or range."""


class ModelLoadError(TrojanGuardError, ValueError):
    """A model file cannot be loaded safely or does not match the requested architecture."""


def check_choice(name: str, value, choices) -> None:
    """ValueError ``"<name>: expected one of <choices>, got <value>"`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_positive_int(name: str, value) -> None:
    """ValueError ``"<name>: expected a positive integer, got <value>"`` unless ``value`` is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
