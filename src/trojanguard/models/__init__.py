"""Reference models: a small CNN for fast CPU work and the CIFAR-style ResNet-18 of the papers.

Any ``torch.nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] works with the SDK; models
carry their own normalisation (see :class:`Normalize`).
"""

from trojanguard.models.compiled import CompiledModel
from trojanguard.models.io import load_model, model_sha256, save_model
from trojanguard.models.nets import MODELS, Normalize, ResNet18, SmallCNN, build_model

__all__ = ["MODELS", "CompiledModel", "Normalize", "ResNet18", "SmallCNN", "build_model", "load_model", "model_sha256", "save_model"]
