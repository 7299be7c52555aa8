"""Ops with interchangeable backends (reference PyTorch, C++ CPU, CUDA, Triton); see ``_backends``."""

from trojanguard.ops._backends import (
    BACKEND_NAMES,
    OPS,
    BackendUnavailableError,
    backend_availability,
    op_backend_availability,
    use_backend,
)
from trojanguard.ops.mask_step import (
    MaskStepParams,
    blend_reference,
    mask_from_theta,
    mask_gradient_reference,
    mask_step,
    mask_step_reference,
    regularizer_reference,
    uniform_noise,
)

__all__ = [
    "BACKEND_NAMES",
    "OPS",
    "BackendUnavailableError",
    "MaskStepParams",
    "backend_availability",
    "blend_reference",
    "mask_from_theta",
    "mask_gradient_reference",
    "mask_step",
    "mask_step_reference",
    "op_backend_availability",
    "regularizer_reference",
    "uniform_noise",
    "use_backend",
]
