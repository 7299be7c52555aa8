"""trojanguard: backdoor defence for PyTorch models — detect poisoned data, cleanse models, guard serving."""

from trojanguard.errors import DataError, ModelLoadError, TrojanGuardError

__version__ = "0.1.0"

__all__ = ["__version__", "TrojanGuardError", "DataError", "ModelLoadError"]
