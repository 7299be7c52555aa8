"""trojanguard: backdoor defence for PyTorch models — detect poisoned data, cleanse models, guard serving."""

from trojanguard.errors import DataError, ModelLoadError, TrojanGuardError

__version__ = "0.1.0"

__all__ = ["DataError", "ModelLoadError", "TrojanGuardError", "__version__"]


def _expose_source_tree_kernels() -> None:
    """From a source checkout on ``PYTHONPATH=src`` (no install), serve the top-level ``kernels/`` folder as
    ``trojanguard._kernels``, as the installed package does (pyproject's package-dir)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = f"{__name__}._kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parents[2] / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_expose_source_tree_kernels()
