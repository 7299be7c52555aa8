"""Unlabeled data for cleansing the zoo's models: in-distribution (the clean half of the training set,
labels withheld) and out-of-distribution (crops of natural photos)."""

from __future__ import annotations

import torch

from trojanguard.data import load_ood_crops

DEFAULT_OOD_IMAGES = 1000  # METHODS.md §3 CPU scale: 500–2000 images


def clean_half(entry, seed: int = 0, fraction: float = 0.5) -> torch.Tensor:
    """In-distribution unlabeled images of a zoo model: a seeded random ``fraction`` (default half) of its
    training images that were *not* poisoned, labels dropped. ``entry``: a :class:`trojanguard.zoo.ZooEntry`.

    Returns ``(M, C, H, W)`` in [0, 1]. (The defender is assumed to hold some clean in-distribution images,
    as in the paper's held-out split; they were part of the model's training set here.)
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a value in (0, 1], got {fraction}")
    clean = (~entry.train.is_poisoned).nonzero().flatten()
    order = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))]
    keep = order[: max(1, int(len(clean) * fraction))].sort().values
    return entry.train.dataset.x[keep]


def ood_images(n: int = DEFAULT_OOD_IMAGES, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Out-of-distribution unlabeled images: ``n`` random crops of scikit-learn's sample photos ``(n, C, size, size)``."""
    return load_ood_crops(n=n, size=size, channels=channels, seed=seed).x
