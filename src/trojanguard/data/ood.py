"""Out-of-distribution unlabeled images: random crops of scikit-learn's sample photos, and procedural images
generated on the fly (no download, no file): dead leaves and fractal noise.

Used to cleanse a model when no in-distribution data is at hand (BCU's out-of-distribution mode). The procedural
sources follow what data-free and "learning from noise" work found to carry the statistics of natural images
(Baradad et al., NeurIPS 2021: occlusion, scale invariance, a 1/f^α power spectrum):

- ``dead_leaves``: opaque discs of random colour with radii drawn from ``p(r) ∝ r⁻³`` (the scale-invariant law),
  painted one over another until the image is covered: edges, occlusion and flat regions at every scale.
- ``fractal``: noise whose amplitude spectrum falls as ``1/f^α`` (α drawn per image in [1, 2.5]: from rough to
  smooth), its channels mixed by a random colour matrix so colours are correlated as in photos.

Each generator is a pure function of ``seed``; :data:`OOD_SOURCES` names every source.
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


OOD_SOURCES = ("photos", "dead_leaves", "fractal")
DEAD_LEAVES_DISCS = 160  # discs per image: enough that the first (background) colour is almost always covered
FRACTAL_ALPHA = (1.0, 2.5)  # spectral slope range: 1 = rough, 2.5 = smooth (natural photos: about 2)


def load_procedural(kind: str, n: int = 1000, size: int = 32, channels: int = 3, seed: int = 0) -> ImageDataset:
    """``n`` procedural images ``(n, channels, size, size)`` in [0, 1] of ``kind`` (``dead_leaves`` or
    ``fractal``, module docstring), generated from ``seed``."""
    if kind not in ("dead_leaves", "fractal"):
        raise DataError(f"kind: expected 'dead_leaves' or 'fractal', got {kind!r}")
    if n <= 0:
        raise DataError(f"n: expected a positive number of images, got {n}")
    if size < 4:
        raise DataError(f"size: expected an image side of at least 4 pixels, got {size}")
    if channels not in (1, 3):
        raise DataError(f"channels: expected 1 or 3, got {channels}")
    gen = torch.Generator().manual_seed(seed)
    x = _dead_leaves(n, size, gen) if kind == "dead_leaves" else _fractal(n, size, gen)
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    return ImageDataset(x.clamp(0, 1).contiguous())


def _dead_leaves(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Discs painted back to front (each new disc occludes the earlier ones), radii ``p(r) ∝ r⁻³`` on
    ``[0.5 px, size / 2]`` by inverse-CDF sampling, centres uniform (also just outside the image)."""
    r_min, r_max = 0.5, size / 2
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    rows, cols = grid.view(1, size, 1), grid.view(1, 1, size)
    x = torch.rand(n, 3, 1, 1, generator=gen).expand(n, 3, size, size).clone()  # background colour
    for _ in range(DEAD_LEAVES_DISCS):
        u = torch.rand(n, generator=gen)
        radius = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5
        centre = torch.rand(n, 2, generator=gen) * (size + 2 * radius[:, None]) - radius[:, None]
        inside = (rows - centre[:, 0, None, None]) ** 2 + (cols - centre[:, 1, None, None]) ** 2 <= radius.view(n, 1, 1) ** 2
        colour = torch.rand(n, 3, 1, 1, generator=gen)
        x = torch.where(inside[:, None], colour, x)
    return x


def _fractal(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random-phase noise with amplitude ``1/f^α`` per image, channels mixed by a random colour matrix, each image
    stretched to [0, 1]."""
    frequency = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2)
    frequency[0, 0] = 1.0  # the mean: set separately below
    lo, hi = FRACTAL_ALPHA
    alpha = lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=gen)
    white = torch.randn(n, 3, size, size, generator=gen)
    spectrum = torch.fft.rfft2(white) / frequency ** alpha
    spectrum[..., 0, 0] = 0
    noise = torch.fft.irfft2(spectrum, s=(size, size))
    mixing = torch.rand(n, 3, 3, generator=gen) + torch.eye(3)  # correlated channels, each still its own
    noise = torch.einsum("nij,njhw->nihw", mixing, noise)
    low = noise.amin(dim=(1, 2, 3), keepdim=True)
    high = noise.amax(dim=(1, 2, 3), keepdim=True)
    return (noise - low) / (high - low).clamp_min(1e-12)
