"""Backend registry: which implementations of the ops can run here, and why not where they cannot.

Dispatch order for an op (used by the ops as they arrive): explicit ``backend=`` argument → the
``TROJANGUARD_BACKEND`` environment variable → first available of (cuda, triton, cpp, reference).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

BACKEND_NAMES = ("cuda", "triton", "cpp", "reference")


def _native_module():
    try:
        return importlib.import_module("trojanguard._C")
    except ImportError:
        return None


def not_supported_reasons(backend: str) -> list[str]:
    """Why ``backend`` cannot run on this machine (empty list = available)."""
    import torch

    if backend == "reference":
        return []
    if backend == "cpp":
        return [] if _native_module() is not None else ["trojanguard._C was not built (no C++ compiler at install?)"]
    if backend == "cuda":
        reasons = []
        if not torch.cuda.is_available():
            reasons.append("no CUDA device")
        native = _native_module()
        if native is None or not native.build_info().get("cuda", False):
            reasons.append("trojanguard._C was built without CUDA")
        return reasons
    if backend == "triton":
        reasons = []
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("no CUDA device (set TRITON_INTERPRET=1 to run kernels on CPU, slowly)")
        return reasons
    raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")


def backend_availability() -> dict[str, list[str]]:
    """Map each backend name to its list of reasons it is unavailable (empty = available)."""
    return {name: not_supported_reasons(name) for name in BACKEND_NAMES}
