"""Batch augmentation for cleansing: random crop (zero padding), horizontal flip and additive Gaussian noise, drawn
from a caller's generator on the CPU so a run is reproducible. BCU applies one augmentation per batch; the teacher
answers on the augmented view or on its source (``view_target``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("crop_flip", "crop", "noise", "none")
CROP_PAD_FRACTION = 0.125  # random-crop padding as a fraction of the side: the authors' 4 px at 32 px
NOISE_STD = 0.1  # "noise": per-pixel standard deviation on [0, 1] images — small enough to leave a digit or a photo
# legible, about the size of a blend trigger's per-pixel change (α = 0.2 of a pattern in [0, 1])


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, *, flip: bool = True) -> torch.Tensor:
    """Per-image random crop with zero padding (``CROP_PAD_FRACTION`` of the side) and horizontal flip.

    ``x: (B, C, H, W)`` → same shape; drawn from ``gen`` on the CPU so runs are reproducible.
    """
    b, c, h, w = x.shape
    pad = max(1, round(CROP_PAD_FRACTION * min(h, w)))
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
                 rows, cols]
    if flip:
        flips = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


def gaussian_noise(x: torch.Tensor, gen: torch.Generator, *, std: float = NOISE_STD) -> torch.Tensor:
    """``x`` plus independent Gaussian noise of standard deviation ``std`` per pixel, clipped to [0, 1].

    The noise is drawn from ``gen`` on the CPU (reproducible), then moved to ``x``'s device.
    """
    noise = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    return (x + std * noise).clamp(0, 1)


def make_augment(augment) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """``'crop_flip'``, ``'crop'``, ``'noise'``, ``'none'`` / None, or a callable ``x -> x`` (applied to each batch)."""
    if augment is None or augment == "none":
        return None
    if augment == "crop_flip":
        return lambda x, gen: random_crop_flip(x, gen, flip=True)
    if augment == "crop":
        return lambda x, gen: random_crop_flip(x, gen, flip=False)
    if augment == "noise":
        return gaussian_noise
    if callable(augment):
        return lambda x, gen: augment(x)
    raise ValueError(f"augment: expected one of {AUGMENTATIONS} or a callable x -> x, got {augment!r}")

