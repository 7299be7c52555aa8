"""Triton kernels of the cluster-masking sweep's three memory-bound steps (oracles: the references in
``trojanguard.ops.cluster_sweep``).

* ``_occlude_kernel`` — one program per (copy ``i·W + n``, channel, tile of ``BLOCK`` pixels): reads the image's
  tile once, writes the copy's tile once, the box test done on the flat pixel index (no mask tensor in memory).
* ``_cluster_drop_kernel`` — one program per block of ``ROWS`` feature rows: the dot with the row's own centroid and
  both squared norms accumulated together over ``BLOCK_D`` columns at a time, fp32; one float out per row. The
  features are read exactly once; nothing of size ``(N·W, K)`` exists.
* ``_occlusion_heat_kernel`` — one program per (image, tile of pixels): loops over the windows, adding each drop
  where its box covers the pixel and counting covers; ``O(pixels · W)`` compares, no atomics, deterministic.

All arithmetic in fp32; bf16 / fp16 inputs are upcast on load; ``occlude`` copies in the input's dtype (its fill
values arrive in that dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # pixels per program of occlude and occlusion_heat
ROWS = 16  # feature rows per program of cluster_drop
BLOCK_D = 128  # feature columns per step of cluster_drop
EPS = 1e-12  # F.normalize's floor on a norm


@triton.jit
def _covers(windows_ptr, n, y, x):
    """Whether box ``n`` of ``windows`` (rows: top, left, height, width) covers the pixels at rows ``y``, columns ``x``."""
    top = tl.load(windows_ptr + n * 4)
    left = tl.load(windows_ptr + n * 4 + 1)
    height = tl.load(windows_ptr + n * 4 + 2)
    width = tl.load(windows_ptr + n * 4 + 3)
    return (y >= top) & (y < top + height) & (x >= left) & (x < left + width)


@triton.jit
def _occlude_kernel(x_ptr, windows_ptr, values_ptr, out_ptr, C, HW, Wd, W, TILES, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid % TILES
    plane = pid // TILES  # (i·W + n)·C + c
    c = plane % C
    copy = plane // C
    n = copy % W
    i = copy // W
    p = tile * BLOCK + tl.arange(0, BLOCK)
    valid = p < HW
    y = p // Wd
    x = p % Wd
    inside = _covers(windows_ptr, n, y, x)
    pixels = tl.load(x_ptr + (i * C + c).to(tl.int64) * HW + p, mask=valid, other=0.0)
    value = tl.load(values_ptr + i * C + c)
    tl.store(out_ptr + plane.to(tl.int64) * HW + p, tl.where(inside, value, pixels), mask=valid)


@triton.jit
def _cluster_drop_kernel(features_ptr, centroids_ptr, base_ptr, out_ptr, ROWS_TOTAL, W, D,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < ROWS_TOTAL
    image = rows // W
    dot = tl.zeros((ROWS,), dtype=tl.float32)
    ff = tl.zeros((ROWS,), dtype=tl.float32)
    cc = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        keep = valid[:, None] & (cols[None, :] < D)
        f = tl.load(features_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        c = tl.load(centroids_ptr + image.to(tl.int64)[:, None] * D + cols[None, :], mask=keep, other=0.0)
        dot += tl.sum(f * c, axis=1)
        ff += tl.sum(f * f, axis=1)
        cc += tl.sum(c * c, axis=1)
    similarity = dot / (tl.maximum(tl.sqrt(ff), EPS) * tl.maximum(tl.sqrt(cc), EPS))
    base = tl.load(base_ptr + image, mask=valid, other=0.0)
    tl.store(out_ptr + rows, base - similarity, mask=valid)


@triton.jit
def _occlusion_heat_kernel(drops_ptr, windows_ptr, out_ptr, HW, Wd, W, TILES, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid % TILES
    i = pid // TILES
    p = tile * BLOCK + tl.arange(0, BLOCK)
    valid = p < HW
    y = p // Wd
    x = p % Wd
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    count = tl.zeros((BLOCK,), dtype=tl.float32)
    for n in range(W):
        inside = _covers(windows_ptr, n, y, x)
        drop = tl.load(drops_ptr + i * W + n)
        total += tl.where(inside, drop, 0.0)
        count += tl.where(inside, 1.0, 0.0)
    tl.store(out_ptr + i.to(tl.int64) * HW + p, total / tl.maximum(count, 1.0), mask=valid)


def occlude_triton(x: torch.Tensor, windows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x (N, C, H, W)`` contiguous, ``windows (W, 4)`` int64, ``values (N, C)`` in x's dtype → ``(N·W, C, H, W)``."""
    n, c, h, w = x.shape
    out = torch.empty((n * len(windows), c, h, w), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(h * w, BLOCK)
    _occlude_kernel[(n * len(windows) * c * tiles,)](x, windows, values, out, c, h * w, w, len(windows), tiles,
                                                      BLOCK=BLOCK)
    return out


def cluster_drop_triton(features: torch.Tensor, centroids: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``features (N·W, D)``, ``centroids (N, D)`` float32, ``base (N,)`` float32 → ``(N, W)`` float32."""
    n, d = centroids.shape
    out = torch.empty((n, len(features) // n), dtype=torch.float32, device=features.device)
    _cluster_drop_kernel[(triton.cdiv(len(features), ROWS),)](features, centroids, base, out, len(features),
                                                               out.shape[1], d, ROWS=ROWS, BLOCK_D=BLOCK_D, EPS=EPS)
    return out


def occlusion_heat_triton(drops: torch.Tensor, windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``drops (N, W)`` float32, ``windows (W, 4)`` int64 → ``(N, H, W)`` float32."""
    n = len(drops)
    out = torch.empty((n, height, width), dtype=torch.float32, device=drops.device)
    tiles = triton.cdiv(height * width, BLOCK)
    _occlusion_heat_kernel[(n * tiles,)](drops, windows, out, height * width, width, len(windows), tiles, BLOCK=BLOCK)
    return out
