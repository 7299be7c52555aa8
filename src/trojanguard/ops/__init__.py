"""Ops with interchangeable backends (reference PyTorch, C++ CPU, CUDA, Triton); see ``_backends``."""

from trojanguard.ops._backends import BACKEND_NAMES, backend_availability

__all__ = ["BACKEND_NAMES", "backend_availability"]
