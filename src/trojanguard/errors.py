"""Exceptions of trojanguard: every message names the argument or file, what was expected and what came."""


class TrojanGuardError(Exception):
    """Base class of every error trojanguard raises on purpose."""


class DataError(TrojanGuardError, ValueError):
    """Input data is missing, empty, corrupt or of the wrong shape, dtype or range."""


class ModelLoadError(TrojanGuardError, ValueError):
    """A model file cannot be loaded safely or does not match the requested architecture."""
