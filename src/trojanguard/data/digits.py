"""The embedded default dataset: scikit-learn's 1 797 real handwritten digits (8×8, 10 classes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trojanguard.data.core import ImageDataset, split_indices

DIGITS_MAX_VALUE = 16.0  # scikit-learn stores digit pixels as integers 0..16


def load_digits(
    size: int = 32, channels: int = 3, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Return (train, test) digits resized to ``(channels, size, size)`` in [0, 1]; split is deterministic."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_VALUE
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(bunch.target, dtype=torch.long)
    names = [str(i) for i in range(10)]
    train_idx, test_idx = split_indices(len(y), test_fraction, seed)
    return ImageDataset(x[train_idx], y[train_idx], names), ImageDataset(x[test_idx], y[test_idx], names)
