"""The cluster-masking sweep of PoisonCAM (METHODS.md §2 step 2): the pure-PyTorch reference.

For image ``x`` with own cluster centroid ``c`` (unit vector), ``a(·) = cos(f(·), c)`` with ``f`` the encoder.
Every ``window × window`` square of the sweep (:func:`sweep_windows`) is filled in turn (a constant, or the image's
per-channel mean); ``Δ_n = a(x) − a(x with window n filled)``; the heat map ``H(p)`` is the mean of ``Δ_n`` over the
windows covering pixel ``p``. A trigger carries the image into its cluster, so filling it drops ``a`` the most.

Shapes: ``x (N, C, H, W)`` in [0, 1]; ``centroids (N, D)`` (each image's own centroid, unit norm); heat maps
``(N, H, W)``. Everything is forward-only and fixed-shape: masked copies, one batched forward, a similarity and a
scatter-mean, the pieces a fused kernel replaces (issue 22); this module is their oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FILLS = ("mean",)  # a fill is a constant in [0, 1] or one of these names


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets ``0, stride, 2·stride, …`` of windows inside ``size``, plus one flush with the far border when the
    stride does not land there."""
    if not 1 <= window <= size:
        raise ValueError(f"window: expected a side in [1, {size}] pixels, got {window}")
    if stride < 1:
        raise ValueError(f"stride: expected a positive number of pixels, got {stride}")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def sweep_windows(height: int, width: int, window: int, stride: int) -> torch.Tensor:
    """``(W, 4)`` int64 boxes ``(top, left, window, window)`` of the sweep, rows then columns."""
    rows, cols = window_starts(height, window, stride), window_starts(width, window, stride)
    return torch.tensor([(top, left, window, window) for top in rows for left in cols], dtype=torch.long)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, H, W)`` bool: True inside each box ``(top, left, height, width)``."""
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    top, left, h, w = (boxes[:, i, None, None] for i in range(4))
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def fill_values(x: torch.Tensor, fill: float | str) -> torch.Tensor:
    """``(N, C, 1, 1)`` values a window is filled with: the constant ``fill``, or ``"mean"``: each image's
    per-channel mean."""
    if isinstance(fill, str):
        if fill not in FILLS:
            raise ValueError(f"fill: expected a constant in [0, 1] or one of {list(FILLS)}, got {fill!r}")
        return x.mean(dim=(2, 3), keepdim=True)
    if not 0.0 <= float(fill) <= 1.0:
        raise ValueError(f"fill: expected a constant in [0, 1] or one of {list(FILLS)}, got {fill!r}")
    return torch.full((x.shape[0], x.shape[1], 1, 1), float(fill), dtype=x.dtype, device=x.device)


def masked_copies(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(N·W, C, H, W)``: image ``i`` with window ``n`` set to ``values[i]`` at row ``i·W + n``."""
    n, c, h, w = x.shape
    inside = masks.to(x.device)[None, :, None]  # (1, W, 1, H, W)
    out = torch.where(inside, values[:, None], x[:, None])  # (N, W, C, H, W)
    return out.reshape(n * masks.shape[0], c, h, w)


def own_similarity(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``cos(f, c)`` row by row: ``features (N, D)``, ``centroids (N, D)`` -> ``(N,)``."""
    return (F.normalize(features.float(), dim=1) * F.normalize(centroids.float(), dim=1)).sum(1)


def scatter_mean(drops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Heat maps ``(N, H, W)``: per pixel, the mean of ``drops (N, W)`` over the windows ``masks (W, H, W)`` that
    cover it (0 where none does)."""
    cover = masks.to(drops.dtype).to(drops.device).flatten(1)  # (W, H·W)
    total = drops @ cover
    count = cover.sum(0).clamp_min(1)
    return (total / count).reshape(drops.shape[0], *masks.shape[1:])


@torch.no_grad()
def window_drops_reference(encoder, x: torch.Tensor, centroids: torch.Tensor, windows: torch.Tensor, *,
                           fill: float | str = "mean", batch_size: int = 4096) -> torch.Tensor:
    """``(N, W)``: ``a(x) − a(x with window n filled)`` for every image and every box of ``windows (W, 4)``.

    ``encoder`` maps ``(B, C, H, W)`` to ``(B, D)`` features; ``batch_size`` bounds the masked copies per forward
    (images are processed ``max(1, batch_size // W)`` at a time).
    """
    masks = box_masks(windows, *x.shape[2:])
    per_chunk = max(1, batch_size // len(masks))
    drops = []
    for start in range(0, len(x), per_chunk):
        xs, cs = x[start : start + per_chunk], centroids[start : start + per_chunk]
        base = own_similarity(encoder(xs), cs)
        copies = masked_copies(xs, masks, fill_values(xs, fill))
        masked = own_similarity(encoder(copies), cs.repeat_interleave(len(masks), 0)).view(len(xs), len(masks))
        drops.append(base[:, None] - masked)
    return torch.cat(drops)


def cluster_mask_sweep_reference(encoder, x: torch.Tensor, centroids: torch.Tensor, *, window: int, stride: int,
                                 fill: float | str = "mean", batch_size: int = 4096) -> torch.Tensor:
    """Heat maps ``(N, H, W)`` of the exhaustive cluster-masking sweep (module docstring): the window drops of
    :func:`sweep_windows`, scatter-averaged over the pixels each window covers."""
    windows = sweep_windows(*x.shape[2:], window, stride)
    drops = window_drops_reference(encoder, x, centroids, windows, fill=fill, batch_size=batch_size)
    return scatter_mean(drops, box_masks(windows, *x.shape[2:]))
