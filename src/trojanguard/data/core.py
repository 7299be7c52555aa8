"""The in-memory dataset type shared by every loader, attack and defence."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from trojanguard.errors import DataError

DEFAULT_IMAGE_SIZE = 32  # side image folders (files of any size) and the embedded data are resized to by default


def resize_images(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """``x (N, C, H, W)`` resized to ``size`` × ``size`` (bilinear, antialiased like PIL's resize), or as is when
    ``size`` is None or already the images' size."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    if size < 1:
        raise DataError(f"image size: expected a positive image side, got {size}")
    resized = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp_(0, 1)


def check_images(x: object, name: str = "x") -> torch.Tensor:
    """Validate an image batch: a float tensor ``(N, C, H, W)`` with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name}: expected a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise DataError(f"{name}: expected 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{name}: expected a floating dtype with values in [0, 1], got {x.dtype}")
    if x.numel() and not torch.isfinite(x).all():
        raise DataError(f"{name}: expected finite values in [0, 1], got NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise DataError(
            f"{name}: expected values in [0, 1], got range [{x.min().item():.3g}, {x.max().item():.3g}]"
        )
    return x


@dataclass
class ImageDataset:
    """Images ``x: (N, C, H, W)`` float32 in [0, 1], labels ``y: (N,)`` int64 or None.

    ``skipped`` lists the files a loader could not read (path, reason), so nothing is lost silently.
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    class_names: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_images(self.x, "ImageDataset.x")
        if self.y is not None:
            if self.y.shape != (self.x.shape[0],):
                raise DataError(
                    f"ImageDataset.y: expected shape ({self.x.shape[0]},), got {tuple(self.y.shape)}"
                )
            self.y = self.y.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        if self.y is None:
            raise DataError("dataset has no labels, so it has no number of classes")
        return int(self.y.max().item()) + 1

    def subset(self, index: torch.Tensor) -> ImageDataset:
        y = None if self.y is None else self.y[index]
        return ImageDataset(self.x[index], y, self.class_names)

    def torch_dataset(self) -> TensorDataset:
        if self.y is None:
            return TensorDataset(self.x)
        return TensorDataset(self.x, self.y)


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic shuffled train/test split of ``range(n)``."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return perm[n_test:], perm[:n_test]
