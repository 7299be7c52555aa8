"""Out-of-distribution unlabeled images: random crops of scikit-learn's sample photos, and procedural images
generated on the fly (no download, no file): dead leaves, fractal noise and strokes.

Used to cleanse a model when no in-distribution data is at hand (BCU's out-of-distribution mode). The procedural
sources follow what data-free and "learning from noise" work found to carry the statistics of natural images
(Baradad et al., NeurIPS 2021: occlusion, scale invariance, a 1/f^α power spectrum):

- ``dead_leaves``: opaque discs of random colour with radii drawn from ``p(r) ∝ r⁻³`` (the scale-invariant law),
  painted one over another until the image is covered: edges, occlusion and flat regions at every scale.
- ``fractal``: noise whose amplitude spectrum falls as ``1/f^α`` (α drawn per image in [1, 2.5]: from rough to
  smooth), its channels mixed by a random colour matrix so colours are correlated as in photos.
- ``strokes``: one to four curved strokes (quadratic Bézier curves, 1–3 px wide at 32 px) of random colour on a flat
  background: line drawings — the thin, high-contrast structures of handwriting, symbols and sketches, which photo
  crops scaled to a model's input size rarely hold (ours; issue 16: far data cleansed a digits model's thin "1" away).

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


PROCEDURAL_SOURCES = ("dead_leaves", "fractal", "strokes")
MIXED_SOURCE = "photos+strokes"  # half photo crops, half strokes: natural textures and thin line drawings
OOD_SOURCES = ("photos", *PROCEDURAL_SOURCES, MIXED_SOURCE)
DEAD_LEAVES_DISCS = 160  # discs per image: enough that the first (background) colour is almost always covered
FRACTAL_ALPHA = (1.0, 2.5)  # spectral slope range: 1 = rough, 2.5 = smooth (natural photos: about 2)
STROKES_PER_IMAGE = (1, 4)  # strokes drawn per image (uniform)
STROKE_HALF_WIDTH = (0.8, 2.5)  # px at 32 px (scaled with the size): the core's half width; edges antialiased


def load_procedural(kind: str, n: int = 1000, size: int = 32, channels: int = 3, seed: int = 0) -> ImageDataset:
    """``n`` procedural images ``(n, channels, size, size)`` in [0, 1] of ``kind`` (``dead_leaves``, ``fractal``
    or ``strokes``, module docstring), generated from ``seed``."""
    if kind not in PROCEDURAL_SOURCES:
        raise DataError(f"kind: expected one of {', '.join(PROCEDURAL_SOURCES)}, got {kind!r}")
    if n <= 0:
        raise DataError(f"n: expected a positive number of images, got {n}")
    if size < 4:
        raise DataError(f"size: expected an image side of at least 4 pixels, got {size}")
    if channels not in (1, 3):
        raise DataError(f"channels: expected 1 or 3, got {channels}")
    gen = torch.Generator().manual_seed(seed)
    x = {"dead_leaves": _dead_leaves, "fractal": _fractal, "strokes": _strokes}[kind](n, size, gen)
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    return ImageDataset(x.clamp(0, 1).contiguous())


def load_ood_source(source: str, n: int = 1000, size: int = 32, channels: int = 3, seed: int = 0) -> ImageDataset:
    """``n`` raw images of one of :data:`OOD_SOURCES`: photo crops (:func:`load_ood_crops`), a procedural kind
    (:func:`load_procedural`) or ``photos+strokes`` (the first ``n - n // 2`` photo crops and ``n // 2`` strokes of
    ``seed + 1``, in a random order drawn from ``seed + 2``)."""
    if source not in OOD_SOURCES:
        raise DataError(f"source: expected one of {', '.join(OOD_SOURCES)}, got {source!r}")
    if source == MIXED_SOURCE and n > 1:
        strokes = n // 2
        x = torch.cat([load_ood_crops(n=n - strokes, size=size, channels=channels, seed=seed).x,
                       load_procedural("strokes", n=strokes, size=size, channels=channels, seed=seed + 1).x])
        return ImageDataset(x[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))].contiguous())
    if source in ("photos", MIXED_SOURCE):
        return load_ood_crops(n=n, size=size, channels=channels, seed=seed)
    return load_procedural(source, n=n, size=size, channels=channels, seed=seed)


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


def _strokes(n: int, size: int, gen: torch.Generator, chunk: int = 256) -> torch.Tensor:
    """Quadratic Bézier strokes (control points uniform on the image and a tenth of its side beyond) painted one over
    another on a flat background colour; a pixel's opacity falls from 1 to 0 over the half pixel outside a stroke's
    half width. A pixel's distance to a stroke is the least over the curve's sample points within a small window of
    it (scattered with ``amin``): every pixel a stroke paints lies in that window, the rest stay at opacity 0."""
    k = STROKES_PER_IMAGE[1]
    samples = max(64, 2 * size)  # points per curve: dense enough that a stroke has no gaps
    scale = size / 32
    lo, hi = STROKE_HALF_WIDTH
    reach = int(hi * scale + 0.5) + 2  # > the widest stroke's painted radius + 1 px, in whole pixels
    offsets = torch.arange(-reach, reach + 1)
    t = torch.linspace(0, 1, samples).view(1, samples, 1)
    images = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = torch.rand(m, 3, 1, 1, generator=gen).expand(m, 3, size, size).clone()
        control = torch.rand(m, k, 3, 2, generator=gen) * size * 1.2 - 0.1 * size
        half_width = (lo + (hi - lo) * torch.rand(m, k, generator=gen)) * scale
        strokes = torch.randint(STROKES_PER_IMAGE[0], k + 1, (m, 1), generator=gen)
        colour = torch.rand(m, k, 3, generator=gen)
        for j in range(k):
            p0, p1, p2 = (control[:, j, i, None, :] for i in range(3))
            curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # (m, samples, 2): row, column
            corner = curve.floor().long()
            rows, cols = torch.broadcast_tensors(corner[..., 0, None, None] + offsets.view(1, 1, -1, 1),
                                                 corner[..., 1, None, None] + offsets.view(1, 1, 1, -1))
            centres = torch.stack([rows.float() + 0.5, cols.float() + 0.5], -1)
            distance = (curve[:, :, None, None, :] - centres).norm(dim=-1)
            on_image = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
            distance = torch.where(on_image, distance, torch.full_like(distance, float("inf"))).view(m, -1)
            pixel = (rows.clamp(0, size - 1) * size + cols.clamp(0, size - 1)).view(m, -1)
            nearest = torch.full((m, size * size), float("inf")).scatter_reduce(1, pixel, distance, "amin")
            alpha = ((half_width[:, j, None, None, None] + 0.5 - nearest.view(m, 1, size, size)).clamp(0, 1)
                     * (strokes > j).view(m, 1, 1, 1))
            x = x * (1 - alpha) + colour[:, j, :, None, None] * alpha
        images.append(x)
    return torch.cat(images)
