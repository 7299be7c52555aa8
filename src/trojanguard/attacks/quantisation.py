"""Colour-depth triggers: BppAttack's image quantisation with error-diffusion dithering."""

from __future__ import annotations

import torch

from trojanguard.attacks._helpers import check_int
from trojanguard.attacks.base import Attack

# Floyd–Steinberg error weights: (row offset, column offset, weight)
FLOYD_STEINBERG = ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16))


def quantise(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` in [0, 1] to the nearest of ``2**bits`` evenly spaced levels (0 and 1 included)."""
    top = 2**bits - 1
    return torch.round(x.clamp(0, 1) * top) / top


def floyd_steinberg(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise ``x: (N, C, H, W)`` to ``bits`` per channel, diffusing each pixel's rounding error onto its unvisited
    neighbours (Floyd–Steinberg, raster order). Sequential over the pixels, vectorised over images and channels."""
    work = x.clone()
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            value = work[:, :, i, j]
            level = quantise(value, bits)
            out[:, :, i, j] = level
            error = value - level
            for di, dj, weight in FLOYD_STEINBERG:
                if i + di < h and 0 <= j + dj < w:
                    work[:, :, i + di, j + dj] += weight * error
    return out


class BppAttack(Attack):
    """Reduce every channel to ``bits`` bits with Floyd–Steinberg dithering (Wang, Zhai & Ma, CVPR 2022,
    "BppAttack"): no pattern is added; the trigger is the quantisation and its dither texture, the same on every
    image up to the image's own content. Dirty-label. The paper also trains on adversarial negatives (contrastive
    adversarial training), which needs control of the training loop; the zoo only poisons data, so we leave it out.
    """

    name = "bpp"

    def __init__(self, bits: int = 5, dither: bool = True):
        self.bits = check_int("bits", bits, 1, "a colour depth in bits")
        if self.bits > 8:
            raise ValueError(f"bits: expected a colour depth in [1, 8], got {bits!r}")
        if not isinstance(dither, bool):
            raise TypeError(f"dither: expected True or False, got {dither!r}")
        self.dither = dither

    def _apply(self, x, gen):
        return floyd_steinberg(x, self.bits) if self.dither else quantise(x, self.bits)
