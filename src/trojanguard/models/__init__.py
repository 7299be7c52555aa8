"""Reference models: a small CNN for fast CPU work and the CIFAR-style ResNet-18 of the papers.

Any ``torch.nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] works with the SDK; models
carry their own normalisation (see :class:`Normalize`). What a method needs is one of three kinds
(:class:`Classifier`, :class:`Encoder`, :class:`ImageText`, in :mod:`trojanguard.models.adapters`), made from what
the user has with :func:`as_classifier`, :func:`as_encoder` or :func:`as_image_text`.
"""

from trojanguard.models.adapters import (
    Classifier,
    Encoder,
    ImageText,
    as_classifier,
    as_encoder,
    as_image_text,
    unwrap,
)
from trojanguard.models.compiled import CompiledModel
from trojanguard.models.io import load_model, model_sha256, save_model
from trojanguard.models.nets import MODELS, Normalize, ResNet18, SmallCNN, build_model

__all__ = [
    "MODELS", "Classifier", "CompiledModel", "Encoder", "ImageText", "Normalize", "ResNet18", "SmallCNN",
    "as_classifier", "as_encoder", "as_image_text", "build_model", "load_model", "model_sha256", "save_model", "unwrap",
]
