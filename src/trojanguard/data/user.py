"""User data: image folders (class sub-folders or flat) and ``.npz`` arrays."""

from __future__ import annotations

import logging
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from trojanguard.data.core import DEFAULT_IMAGE_SIZE, ImageDataset, check_images, resize_images
from trojanguard.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SIXTEEN_BIT_MAX = 65535.0  # PIL's "I;16*" modes and the "I" mode 16-bit PNG / TIFF files open in
READ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError)  # what a corrupt array raises


def read_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image file as ``(channels, size, size)`` float32 in [0, 1] (bilinear resize); raises on corrupt or
    truncated files (the whole file is decoded here).

    The EXIF orientation is applied (phone photos come upright). 8-bit modes (L, RGB, P, CMYK, 1-bit, with or
    without alpha) are converted by PIL, alpha dropped as ``convert("RGB")`` does; 16-bit grayscale ("I;16",
    "I") is scaled by 65535 and 32-bit float ("F") must already lie in [0, 1], so no bit depth is clipped.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()  # forces a full decode: truncated files fail here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":
            gray = Image.fromarray(_high_depth_gray(img)).resize((size, size), Image.BILINEAR)
            arr = np.clip(np.asarray(gray, dtype=np.float32), 0, 1)[:, :, None].repeat(channels, axis=2)
        else:
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
            img = img.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def _high_depth_gray(img) -> np.ndarray:
    """A 16-bit or 32-bit grayscale image as float32 ``(H, W)`` in [0, 1], scaled by its real bit depth."""
    values = np.asarray(img)
    if img.mode == "F":
        gray = values.astype(np.float32)
        if not np.isfinite(gray).all() or (gray.size and (gray.min() < 0 or gray.max() > 1)):
            raise ValueError(f"32-bit float image: expected values in [0, 1], got range [{np.nanmin(gray):.3g}, "
                             f"{np.nanmax(gray):.3g}] (NaN/inf: {not np.isfinite(gray).all()})")
        return gray
    if values.size and (values.min() < 0 or values.max() > SIXTEEN_BIT_MAX):
        raise ValueError(f"{img.mode} image: expected 16-bit values 0..65535, got range [{values.min()}, "
                         f"{values.max()}]")
    return (values.astype(np.float32) / np.float32(SIXTEEN_BIT_MAX)).astype(np.float32)


def list_image_files(path: str | Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """The image files of a folder in a fixed order, without reading them: ``([(file, label), ...], class
    names)``. Sub-folders are classes (sorted names, label = position); a flat folder has label -1 and no
    class names."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"image folder {str(root)!r}: expected an existing folder, got a path that does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r}: expected a folder, got a file")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if class_dirs:
        entries = [(f, label) for label, d in enumerate(class_dirs) for f in sorted(d.iterdir())]
        names: list[str] | None = [d.name for d in class_dirs]
    else:
        entries = [(f, -1) for f in sorted(root.iterdir())]
        names = None
    files = [(f, label) for f, label in entries if f.is_file()]
    entries = [(f, label) for f, label in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        found = "an empty folder" if not files else f"{len(files)} files, none with an image suffix"
        raise DataError(f"image folder {str(root)!r} holds no image files: expected {', '.join(sorted(IMAGE_SUFFIXES))} "
                        f"files directly inside or in class sub-folders, got {found}")
    return entries, names


def unreadable_folder_message(root: Path, total: int, skipped: list[tuple[str, str]], examples: int = 3) -> str:
    """The one-line error for a folder none of whose ``total`` image files could be read, with a few reasons."""
    reasons = "; ".join(f"{Path(file).name}: {_short_reason(root / file, reason)}" for file, reason in skipped[:examples])
    more = f"; … {len(skipped) - examples} more" if len(skipped) > examples else ""
    return (f"image folder {str(root)!r}: expected readable images, but none of {total} image files could be read "
            f"({reasons}{more})")


def _short_reason(file: Path, reason: str) -> str:
    """A read error without the file's path (already named) nor the per-row prefix."""
    return reason.removeprefix("unreadable image: ").replace(f" {str(file)!r}", "").replace(str(file), file.name)


def load_image_folder(path: str | Path, size: int | None = DEFAULT_IMAGE_SIZE, channels: int = 3) -> ImageDataset:
    """Load a folder of images. Sub-folders are classes (sorted names); a flat folder has no labels. Every image
    is resized to ``size`` × ``size`` (None: the default, 32 — the files' own sizes may differ).

    Unreadable or corrupt files are skipped and listed in ``dataset.skipped`` with the reason; the load
    fails only if no image at all can be read.
    """
    root = Path(path)
    if channels not in (1, 3):
        raise DataError(f"channels: expected 1 or 3, got {channels}")
    size = DEFAULT_IMAGE_SIZE if size is None else size
    if size < 1:
        raise DataError(f"image size: expected a positive image side, got {size}")
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
        raise DataError(unreadable_folder_message(root, len(entries), skipped))
    y = torch.tensor(labels) if names is not None else None
    return ImageDataset(torch.stack(images), y, names, skipped)


def check_npz_file(path: str | Path) -> Path:
    """``path`` as a Path if it is an existing file; else a DataError saying what it is instead."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"npz file {str(p)!r}: expected an .npz file, got a folder")
    if not p.is_file():
        raise DataError(f"npz file {str(p)!r}: expected an existing .npz file, got a path that does not exist")
    return p


def check_npz_layout(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """The image array layouts an ``.npz`` may hold: uint8 ``(N, H, W, C)`` or float ``(N, C, H, W)``, C in (1, 3),
    at least one image of at least 1 × 1."""
    if dtype == np.uint8:
        layout, channels, sides = "uint8 (N, H, W, C)", shape[-1] if len(shape) == 4 else None, shape[1:3]
    elif np.issubdtype(dtype, np.floating):
        layout, channels, sides = "float (N, C, H, W)", shape[1] if len(shape) == 4 else None, shape[2:4]
    else:
        raise DataError(f"{where}: expected uint8 (N, H, W, C) or float (N, C, H, W) images, got dtype {dtype}")
    if len(shape) != 4:
        raise DataError(f"{where}: expected 4 dimensions, {layout}, got shape {tuple(shape)}")
    if channels not in (1, 3):
        raise DataError(f"{where}: expected {layout} with C in (1, 3), got shape {tuple(shape)}")
    if shape[0] == 0 or min(sides) == 0:
        raise DataError(f"{where}: expected at least one image of at least 1 × 1, got shape {tuple(shape)}")


def check_npz_labels(y: np.ndarray, count: int, where: str) -> np.ndarray:
    """Labels of ``count`` images: integer ``(count,)`` ≥ 0."""
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: expected integer labels, got dtype {y.dtype}")
    if y.shape != (count,):
        raise DataError(f"{where}: expected shape ({count},), got {y.shape}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: expected labels ≥ 0, got minimum {y.min()}")
    return y


def npz_images_to_tensor(x: np.ndarray, where: str) -> torch.Tensor:
    """A checked layout (see :func:`check_npz_layout`) as float32 ``(N, C, H, W)`` in [0, 1]; NaN, infinite or
    out-of-range float values are a DataError naming ``where``."""
    if x.dtype == np.uint8:
        array = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
        return torch.from_numpy(np.divide(array, np.float32(255), out=array))
    if not np.isfinite(x).all():
        raise DataError(f"{where}: expected finite values in [0, 1], got NaN or infinite values")
    return check_images(torch.from_numpy(x.astype(np.float32, order="C")), where)


def _read_npz_array(arrays, key: str, path: Path) -> np.ndarray:
    try:
        return arrays[key]
    except READ_ERRORS as exc:
        raise DataError(f"npz file {str(path)!r} array {key!r}: expected a readable array, got {type(exc).__name__}: "
                        f"{exc} (truncated or corrupt file, or an object array that needs unpickling)") from None


def load_npz(path: str | Path, images_key: str = "x", labels_key: str = "y", size: int | None = None) -> ImageDataset:
    """Load ``.npz`` arrays: images uint8 ``(N, H, W, C)`` (0..255) or float ``(N, C, H, W)`` in [0, 1], optional
    integer labels. ``size``: resize the images to ``size`` × ``size`` (None: keep the arrays' own size)."""
    p = check_npz_file(path)
    try:
        arrays = np.load(p, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 — not a zip, truncated, a pickle: numpy raises many kinds
        raise DataError(f"npz file {str(p)!r}: expected a NumPy .npz archive, got a file that cannot be read "
                        f"({type(exc).__name__}: {exc})") from None
    if not hasattr(arrays, "files"):  # np.load also reads a bare .npy
        raise DataError(f"npz file {str(p)!r}: expected an .npz archive of named arrays, got a single .npy array")
    with arrays:
        if images_key not in arrays:
            raise DataError(f"npz file {str(p)!r}: no array named {images_key!r}; expected one, got arrays "
                            f"{list(arrays.keys())}")
        x = _read_npz_array(arrays, images_key, p)
        y = _read_npz_array(arrays, labels_key, p) if labels_key in arrays else None
    where = f"npz file {str(p)!r} array {images_key!r}"
    check_npz_layout(x.shape, x.dtype, where)
    images = resize_images(npz_images_to_tensor(x, where), size)
    labels = None
    if y is not None:
        labels = torch.from_numpy(check_npz_labels(y, x.shape[0], f"npz file {str(p)!r} array {labels_key!r}")
                                  .astype(np.int64))
    return ImageDataset(images.contiguous(), labels)


def load_image_path(path: str | Path, name: str = "data") -> ImageDataset:
    """The images of an image folder (:func:`load_image_folder`, each at its default size) or an ``.npz`` file
    (:func:`load_npz`, the arrays' own size), told apart by what ``path`` is; a DataError naming ``name`` when it
    does not exist."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{name}: expected an image folder or an .npz file, got {str(path)!r}, which does not exist")
    return load_npz(path) if path.is_file() else load_image_folder(path, size=None)
