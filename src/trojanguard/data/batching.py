"""One way to walk any image source in chunks: a tensor, an ImageDataset, a Dataset or a DataLoader."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from trojanguard.data.core import ImageDataset, check_images


def _images_of(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def count_images(data) -> int | None:
    """Number of images in ``data`` if known up front (for progress bars), else None."""
    if isinstance(data, (torch.Tensor, ImageDataset)):
        return len(data)
    if isinstance(data, DataLoader):
        try:
            return len(data.dataset)
        except TypeError:
            return None
    try:
        return len(data)
    except TypeError:
        return None


def iter_image_batches(data, batch_size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield ``(x (B, C, H, W) in [0, 1], index of x[0] in the whole source)``.

    Tensors, ImageDatasets and Datasets are chunked by ``batch_size``; a DataLoader keeps its own batches.
    Dataset items may be images or (image, label, ...) tuples.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if isinstance(data, ImageDataset):
        data = data.x
    if isinstance(data, torch.Tensor):
        check_images(data, "x")
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size], start
        return
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, DataLoader):
        raise TypeError(f"x: expected a tensor, ImageDataset, Dataset or DataLoader, got {type(data).__name__}")
    start = 0
    for item in data:
        x = check_images(_images_of(item), f"batch at index {start}")
        yield x, start
        start += len(x)
