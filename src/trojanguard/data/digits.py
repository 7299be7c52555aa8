"""The embedded default dataset: scikit-learn's 1 797 real handwritten digits (8×8, 10 classes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trojanguard.data.core import ImageDataset, split_indices

DIGITS_MAX_VALUE = 16.0  # scikit-learn stores digit pixels as integers 0..16


MIN_CONTRAST = 0.35  # colour digits: least mean |foreground − background| over the channels
TEXTURE_AMPLITUDE = 0.12  # colour digits: peak of the smooth background texture
COLOUR_SEED = 12345  # colour digits: the same colours whatever the split seed
TEXTURE_GRID = 4  # colour digits: the texture is random values on this grid, upsampled bilinearly


def colourize(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Grey images ``(N, 3, H, W)`` (ink = brightness) recoloured per image: a random ink and background colour with
    at least ``MIN_CONTRAST`` between them, plus a smooth random texture — so that clean images vary in colour and
    texture as natural ones do, and a trigger that adds colour or texture is not trivially an outlier (on grey
    digits, a detector using no model at all, an image's colour spread, separates most trigger families).
    Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    ink, paper = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    weak = (ink - paper).abs().mean(1, keepdim=True) < MIN_CONTRAST
    ink = torch.where(weak, 1 - paper, ink)  # the complement is at least 0.35 away unless paper is near grey 0.5
    weak = (ink - paper).abs().mean(1, keepdim=True) < MIN_CONTRAST
    ink = torch.where(weak, (paper < 0.5).float(), ink)  # then black or white ink, per channel away from paper
    texture = torch.rand(n, 3, TEXTURE_GRID, TEXTURE_GRID, generator=g) * 2 - 1
    texture = F.interpolate(texture, size=(h, w), mode="bilinear", align_corners=False) * TEXTURE_AMPLITUDE
    level = x.mean(1, keepdim=True)
    return (paper * (1 - level) + ink * level + texture).clamp(0, 1)


def load_digits(
    size: int = 32, channels: int = 3, test_fraction: float = 0.2, seed: int = 0, colour: bool = False
) -> tuple[ImageDataset, ImageDataset]:
    """Return (train, test) digits resized to ``(channels, size, size)`` in [0, 1]; split is deterministic.
    ``colour``: each image recoloured by :func:`colourize` (needs ``channels=3``)."""
    if colour and channels != 3:
        raise ValueError(f"channels: colour digits have 3 channels, got {channels}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_VALUE
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, channels, -1, -1).contiguous()
    if colour:
        x = colourize(x, seed=COLOUR_SEED)
    y = torch.tensor(bunch.target, dtype=torch.long)
    names = [str(i) for i in range(10)]
    train_idx, test_idx = split_indices(len(y), test_fraction, seed)
    return ImageDataset(x[train_idx], y[train_idx], names), ImageDataset(x[test_idx], y[test_idx], names)
