"""Batch augmentation for cleansing: random crop (zero padding) and horizontal flip, drawn from a caller's
generator on the CPU so a run is reproducible. BCU applies one augmentation per batch and feeds the *same*
augmented images to teacher and student."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("crop_flip", "crop", "none")
CROP_PAD_FRACTION = 0.125  # random-crop padding as a fraction of the side: the authors' 4 px at 32 px


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


def make_augment(augment) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """``'crop_flip'``, ``'crop'``, ``'none'`` / None, or a callable ``x -> x`` (applied to each batch)."""
    if augment is None or augment == "none":
        return None
    if augment == "crop_flip":
        return lambda x, gen: random_crop_flip(x, gen, flip=True)
    if augment == "crop":
        return lambda x, gen: random_crop_flip(x, gen, flip=False)
    if callable(augment):
        return lambda x, gen: augment(x)
    raise ValueError(f"augment: expected one of {AUGMENTATIONS} or a callable x -> x, got {augment!r}")

