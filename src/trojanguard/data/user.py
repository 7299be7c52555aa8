"""User data: image folders (class sub-folders or flat) and ``.npz`` arrays."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from trojanguard.data.core import ImageDataset
from trojanguard.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image file as ``(channels, size, size)`` float32 in [0, 1] (bilinear resize); raises on corrupt or
    truncated files (the whole file is decoded here)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # forces a full decode: truncated files fail here, not later
        img = img.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def list_image_files(path: str | Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """The image files of a folder in a fixed order, without reading them: ``([(file, label), ...], class
    names)``. Sub-folders are classes (sorted names, label = position); a flat folder has label -1 and no
    class names."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if class_dirs:
        entries = [(f, label) for label, d in enumerate(class_dirs) for f in sorted(d.iterdir())]
        names: list[str] | None = [d.name for d in class_dirs]
    else:
        entries = [(f, -1) for f in sorted(root.iterdir())]
        names = None
    entries = [(f, label) for f, label in entries if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        raise DataError(f"image folder {str(root)!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return entries, names


def load_image_folder(path: str | Path, size: int = 32, channels: int = 3) -> ImageDataset:
    """Load a folder of images. Sub-folders are classes (sorted names); a flat folder has no labels.

    Unreadable or corrupt files are skipped and listed in ``dataset.skipped`` with the reason; the load
    fails only if no image at all can be read.
    """
    root = Path(path)
    entries, names = list_image_files(root)
    images, labels, skipped = [], [], []
    for f, label in entries:
        try:
            images.append(read_image(f, size, channels))
            labels.append(label)
        except Exception as exc:  # noqa: BLE001 — corrupt, truncated or unsupported: skip, count, report
            skipped.append((str(f), f"{type(exc).__name__}: {exc}"))
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(skipped), root, skipped[0][0])
    if not images:
        raise DataError(f"image folder {str(root)!r}: none of {len(entries)} image files could be read")
    y = torch.tensor(labels) if names is not None else None
    return ImageDataset(torch.stack(images), y, names, skipped)


def load_npz(path: str | Path, images_key: str = "x", labels_key: str = "y") -> ImageDataset:
    """Load ``.npz`` arrays: images uint8 ``(N, H, W, C)`` (0..255) or float ``(N, C, H, W)`` in [0, 1]."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz file {str(p)!r} does not exist")
    try:
        arrays = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"npz file {str(p)!r} cannot be read: {exc}") from exc
    with arrays:
        if images_key not in arrays:
            raise DataError(f"npz file {str(p)!r}: no array named {images_key!r} (found {list(arrays.keys())})")
        x = arrays[images_key]
        y = arrays[labels_key] if labels_key in arrays else None
    if x.ndim != 4:
        raise DataError(f"npz {images_key!r}: expected 4 dimensions, got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[-1] not in (1, 3):
            raise DataError(f"npz {images_key!r}: uint8 images must be (N, H, W, C) with C in (1, 3), got {x.shape}")
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        if x.shape[1] not in (1, 3):
            raise DataError(f"npz {images_key!r}: float images must be (N, C, H, W) with C in (1, 3), got {x.shape}")
        t = torch.from_numpy(x.astype(np.float32))
        if not np.isfinite(x).all():
            raise DataError(f"npz {images_key!r}: float images hold NaN or infinite values")
    else:
        raise DataError(f"npz {images_key!r}: expected uint8 (N, H, W, C) or float (N, C, H, W), got dtype {x.dtype}")
    labels = None
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"npz {labels_key!r}: expected integer labels, got dtype {y.dtype}")
        if y.shape != (x.shape[0],):
            raise DataError(f"npz {labels_key!r}: expected shape ({x.shape[0]},), got {y.shape}")
        if y.size and y.min() < 0:
            raise DataError(f"npz {labels_key!r}: labels must be ≥ 0, got minimum {y.min()}")
        labels = torch.from_numpy(y.astype(np.int64))
    return ImageDataset(t.contiguous(), labels)
