"""Image–caption pairs from files, for the image–text defences (UBT, CleanCLIP):

* an ``.npz`` with an ``images`` array (uint8 ``(N, H, W, C)`` or float ``(N, C, H, W)`` in [0, 1]) and a
  ``captions`` array of N strings (a NumPy unicode array: read without unpickling);
* a folder with a ``captions.csv`` (columns ``file``, ``caption``; files relative to the folder).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trojanguard.data.core import resize_images
from trojanguard.data.user import (
    _read_npz_array,
    check_npz_file,
    check_npz_layout,
    npz_images_to_tensor,
    read_image,
)
from trojanguard.errors import DataError

CAPTIONS_CSV = "captions.csv"


@dataclass
class CaptionedImages:
    """``images (N, C, H, W)`` in [0, 1] and their ``captions``; ``skipped``: unreadable files and why."""

    images: torch.Tensor
    captions: list[str]
    skipped: list[tuple[str, str]]


def load_pairs(path: str | Path, size: int | None = None, channels: int = 3) -> CaptionedImages:
    """Image–caption pairs from an ``.npz`` or a folder with a captions CSV (the module docstring); ``size``
    resizes the images (None: an ``.npz`` keeps its size, a folder's files are read at 32 px)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"pairs {str(path)!r}: expected an .npz file or a folder with {CAPTIONS_CSV}, got a path that "
                        "does not exist")
    return _load_folder(path, size, channels) if path.is_dir() else _load_npz(path, size)


def _load_npz(path: Path, size: int | None) -> CaptionedImages:
    check_npz_file(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 — not a zip, truncated, a pickle
        raise DataError(f"pairs {str(path)!r}: expected a NumPy .npz archive, got a file that cannot be read "
                        f"({type(exc).__name__}: {exc})") from None
    if not hasattr(arrays, "files"):
        raise DataError(f"pairs {str(path)!r}: expected an .npz archive of named arrays, got a single .npy array")
    with arrays:
        missing = [key for key in ("images", "captions") if key not in arrays]
        if missing:
            raise DataError(f"pairs {str(path)!r}: expected arrays 'images' and 'captions', got {list(arrays.keys())}")
        x = _read_npz_array(arrays, "images", path)
        captions = _read_npz_array(arrays, "captions", path)
    check_npz_layout(x.shape, x.dtype, f"pairs {str(path)!r} array 'images'")
    if captions.dtype.kind not in "US" or captions.shape != (x.shape[0],):
        raise DataError(f"pairs {str(path)!r} array 'captions': expected {x.shape[0]} strings (one per image), got "
                        f"dtype {captions.dtype} of shape {captions.shape}")
    try:
        texts = [c.decode() if isinstance(c, bytes) else str(c) for c in captions.tolist()]
    except UnicodeDecodeError as exc:
        raise DataError(f"pairs {str(path)!r} array 'captions': expected UTF-8 text, got bytes that are not ({exc})"
                        ) from None
    images = resize_images(npz_images_to_tensor(x, f"pairs {str(path)!r} array 'images'"), size)
    return CaptionedImages(images.contiguous(), texts, [])


def _load_folder(root: Path, size: int | None, channels: int) -> CaptionedImages:
    table = root / CAPTIONS_CSV
    if not table.is_file():
        raise DataError(f"pairs {str(root)!r}: expected a folder with {CAPTIONS_CSV} (columns file, caption), got a "
                        f"folder without it")
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"pairs {str(table)!r}: expected a UTF-8 CSV, got {type(exc).__name__}: {exc}") from None
    if not rows or not {"file", "caption"} <= set(rows[0]):
        got = "no rows" if not rows else f"columns {list(rows[0])}"
        raise DataError(f"pairs {str(table)!r}: expected columns file, caption and at least one row, got {got}")
    images, captions, skipped = [], [], []
    for row in rows:
        file = root / (row["file"] or "")
        try:
            images.append(read_image(file, size or 32, channels))
            captions.append(row["caption"] or "")
        except Exception as exc:  # noqa: BLE001 — missing, corrupt or truncated: skip, report
            skipped.append((str(file), f"{type(exc).__name__}: {exc}"))
    if not images:
        raise DataError(f"pairs {str(table)!r}: none of its {len(rows)} image files could be read (e.g. "
                        f"{skipped[0][0]}: {skipped[0][1]})")
    return CaptionedImages(torch.stack(images), captions, skipped)
