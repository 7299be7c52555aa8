"""Loader of the native extension ``trojanguard._C`` (C++ CPU ops; CUDA ops where built).

PLACEHOLDER — being replaced by the native-backend work (C++ CPU + CUDA + JIT build).
"""

from __future__ import annotations

import importlib


def _module():
    try:
        return importlib.import_module("trojanguard._C")
    except ImportError:
        return None


def cpu_reasons() -> list[str]:
    return [] if _module() is not None else ["trojanguard._C was not built"]


def cuda_reasons() -> list[str]:
    return ["CUDA kernels not built yet"]


def mask_step_cpp_reasons(*args, **kwargs) -> list[str]:
    return ["mask_step has no C++ kernel yet"]


def mask_step_cuda_reasons(*args, **kwargs) -> list[str]:
    return ["mask_step has no CUDA kernel yet"]


def mask_step_cpp(*args, **kwargs):
    raise NotImplementedError


def mask_step_cuda(*args, **kwargs):
    raise NotImplementedError
