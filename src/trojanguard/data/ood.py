"""Out-of-distribution unlabeled images: random crops of scikit-learn's sample photos.

Used to cleanse a model when no in-distribution data is at hand (BCU's out-of-distribution mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trojanguard.data.core import ImageDataset
from trojanguard.errors import DataError


def load_ood_crops(
    n: int = 1000, size: int = 32, channels: int = 3, crop_fraction: tuple[float, float] = (0.05, 0.3),
    seed: int = 0,
) -> ImageDataset:
    """``n`` random square crops (side a random fraction of the photo's short side), resized to ``size``."""
    if n <= 0:
        raise DataError(f"n: expected a positive number of crops, got {n}")
    if channels not in (1, 3):
        raise DataError(f"channels: expected 1 or 3, got {channels}")
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(img).permute(2, 0, 1).float() / 255.0 for img in load_sample_images().images]
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        _, h, w = photo.shape
        lo, hi = crop_fraction
        frac = lo + (hi - lo) * torch.rand((), generator=gen).item()
        side = max(8, int(min(h, w) * frac))
        top = torch.randint(0, h - side + 1, (), generator=gen).item()
        left = torch.randint(0, w - side + 1, (), generator=gen).item()
        crop = photo[:, top : top + side, left : left + side].unsqueeze(0)
        if torch.rand((), generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    x = torch.cat(crops).clamp(0, 1)
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    return ImageDataset(x.contiguous())
