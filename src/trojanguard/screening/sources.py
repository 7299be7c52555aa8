"""Image sources read in order, a batch at a time: a screening run never holds the whole dataset in memory.

Every source has a fixed length and order, gives each sample an id (its path relative to the folder, or its
index), reads any range ``[start, stop)`` as one batch, and has a *fingerprint* — a small JSON-able dict
that changes when the data changes — so that a resumed run can refuse to mix results of different data.

- :class:`TensorSource`: images already in memory (a tensor or an ``ImageDataset``; the embedded digits).
- :class:`FolderSource`: an image folder (class sub-folders or flat); files are decoded per batch. A file
  that cannot be decoded does not stop the run: its row records the reason (``Batch.errors``).
- :class:`NpzSource`: one array of an ``.npz`` file, read row range by row range straight from the zip member
  (stored or deflated), never loaded whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from trojanguard.data.core import DEFAULT_IMAGE_SIZE, ImageDataset, check_images, resize_images
from trojanguard.data.user import (
    READ_ERRORS,
    check_npz_file,
    check_npz_labels,
    check_npz_layout,
    list_image_files,
    npz_images_to_tensor,
    read_image,
    unreadable_folder_message,
)
from trojanguard.errors import DataError, check_positive_int

HASH_CHUNK = 1 << 22  # bytes of tensor data hashed at a time


@dataclass
class Batch:
    """Images ``x: (B, C, H, W)`` float32 in [0, 1] for samples ``start … start + B − 1``; ``ids`` and
    ``labels`` (given labels as text, "" when unknown) per sample; ``errors`` maps a position in the batch to
    why that sample could not be read (its slot in ``x`` holds zeros and is never scored)."""

    start: int
    x: torch.Tensor
    ids: list[str]
    labels: list[str]
    errors: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def readable(self) -> torch.Tensor:
        """Boolean ``(B,)``: the sample was read."""
        ok = torch.ones(len(self), dtype=torch.bool)
        ok[list(self.errors)] = False
        return ok


class ImageSource:
    """Base of every source: ``len(source)``, ``source.read(start, stop) -> Batch``, ``source.fingerprint()``,
    ``source.description``; ``truth`` is a boolean ``(N,)`` tensor of known poisoned samples, or None."""

    description: str = ""
    truth: torch.Tensor | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> Batch:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def integer_labels(self) -> torch.Tensor | None:
        """Every sample's label as a class index ``(N,)``, or None where the source has none (or not for all)."""
        return None

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        """Yield consecutive :class:`Batch` es of ``batch_size`` samples from ``start`` to ``stop`` (the end)."""
        check_positive_int("batch_size", batch_size)
        stop = len(self) if stop is None else min(stop, len(self))
        for first in range(start, stop, batch_size):
            yield self.read(first, min(first + batch_size, stop))

    def take(self, indices: list[int]) -> torch.Tensor:
        """Images ``(len(indices), C, H, W)`` of the given samples (read one by one, in increasing order)."""
        images = {}
        for i in sorted(set(indices)):
            batch = self.read(i, i + 1)
            if batch.errors:
                raise DataError(f"sample {i} ({batch.ids[0]}): {batch.errors[0]}")
            images[i] = batch.x[0]
        return torch.stack([images[i] for i in indices]) if indices else torch.empty(0)

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start < stop <= len(self):
            raise IndexError(f"read: expected 0 <= start < stop <= {len(self)}, got [{start}, {stop})")


class TensorSource(ImageSource):
    """Images in memory: ``x (N, C, H, W)`` in [0, 1] (or an ``ImageDataset``), optional labels, and ``truth``
    (bool (N,), known poisoned samples — the zoo's training sets — for metrics in the report)."""

    def __init__(self, x, labels: torch.Tensor | None = None, *, truth: torch.Tensor | None = None,
                 description: str = "tensor", class_names: list[str] | None = None, size: int | None = None):
        if isinstance(x, ImageDataset):
            labels = x.y if labels is None else labels
            class_names = class_names or x.class_names
            x = x.x
        self.x = resize_images(check_images(x, "data"), size)
        if labels is not None and tuple(labels.shape) != (len(x),):
            raise DataError(f"labels: expected shape ({len(x)},), got {tuple(labels.shape)}")
        if truth is not None and tuple(truth.shape) != (len(x),):
            raise DataError(f"truth: expected shape ({len(x)},), got {tuple(truth.shape)}")
        self.labels, self.truth, self.description = labels, truth, description
        self.class_names = class_names
        self._fingerprint: dict | None = None

    def __len__(self) -> int:
        return len(self.x)

    def read(self, start: int, stop: int) -> Batch:
        self._check_range(start, stop)
        labels = [""] * (stop - start)
        if self.labels is not None:
            labels = [_label_text(int(v), self.class_names) for v in self.labels[start:stop]]
        return Batch(start, self.x[start:stop].float(), [str(i) for i in range(start, stop)], labels)

    def integer_labels(self) -> torch.Tensor | None:
        return None if self.labels is None else torch.as_tensor(self.labels).long()

    def fingerprint(self) -> dict:
        if self._fingerprint is None:  # hashing is a pass over the bytes: once
            digest = hashlib.sha256()
            flat = self.x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
            for offset in range(0, len(flat), HASH_CHUNK):
                digest.update(flat[offset : offset + HASH_CHUNK].data)
            self._fingerprint = {"kind": "tensor", "shape": list(self.x.shape), "dtype": str(self.x.dtype),
                                 "sha256": digest.hexdigest()}
        return self._fingerprint


class FolderSource(ImageSource):
    """An image folder read file by file: class sub-folders (the folder name is the label) or a flat folder.
    Images are resized to ``size`` × ``size`` with ``channels`` channels (1 or 3), as
    :func:`~trojanguard.data.load_image_folder` does. The fingerprint hashes each file's relative path, size
    and modification time (not the bytes: a second full read of a large folder would cost as much as a fast
    detector's pass)."""

    def __init__(self, path: str | Path, size: int = DEFAULT_IMAGE_SIZE, channels: int = 3):
        if channels not in (1, 3):
            raise DataError(f"channels: expected 1 or 3, got {channels}")
        if size < 1:
            raise DataError(f"size: expected a positive image side, got {size}")
        self.root = Path(path)
        self.entries, self.class_names = list_image_files(self.root)
        self.size, self.channels = size, channels
        self.description = f"image folder {self.root} ({len(self.entries)} files" + (
            f", {len(self.class_names)} classes)" if self.class_names else ", no classes)")

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, start: int, stop: int) -> Batch:
        self._check_range(start, stop)
        x = torch.zeros(stop - start, self.channels, self.size, self.size)
        ids, labels, errors = [], [], {}
        for position, (file, label) in enumerate(self.entries[start:stop]):
            ids.append(file.relative_to(self.root).as_posix())
            labels.append(_label_text(label, self.class_names) if label >= 0 else "")
            try:
                x[position] = read_image(file, self.size, self.channels)
            except Exception as exc:  # noqa: BLE001 — corrupt, truncated, unsupported, vanished: recorded per row
                errors[position] = f"unreadable image: {type(exc).__name__}: {exc}"
        return Batch(start, x, ids, labels, errors)

    def integer_labels(self) -> torch.Tensor | None:
        """The class sub-folders' indices (sorted names), when every file is in one."""
        labels = torch.tensor([label for _, label in self.entries], dtype=torch.long)
        return labels if len(labels) and bool((labels >= 0).all()) else None

    def fingerprint(self) -> dict:
        digest = hashlib.sha256()
        for file, label in self.entries:
            try:
                stat = file.stat()
                digest.update(f"{file.relative_to(self.root).as_posix()}\0{label}\0{stat.st_size}\0"
                              f"{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{file.relative_to(self.root).as_posix()}\0missing\n".encode())
        return {"kind": "folder", "files": len(self.entries), "size": self.size, "channels": self.channels,
                "sha256": digest.hexdigest()}


class NpzSource(ImageSource):
    """Images from array ``images_key`` of an ``.npz`` file — uint8 ``(N, H, W, C)`` (0…255) or float
    ``(N, C, H, W)`` in [0, 1], as :func:`~trojanguard.data.load_npz` accepts — read row range by row range
    from the zip member, so only one batch is ever in memory. Labels (``labels_key``, integer ``(N,)``) are
    small and read whole. Values are checked per batch (a NaN or out-of-range value stops the run with the
    sample range named). ``size``: images are resized to ``size`` × ``size`` per batch (None: the arrays' own
    size), as ``--image-size`` does for every source."""

    def __init__(self, path: str | Path, images_key: str = "x", labels_key: str = "y", size: int | None = None):
        self.path = check_npz_file(path)
        if size is not None and size < 1:
            raise DataError(f"image size: expected a positive image side, got {size}")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"npz file {str(self.path)!r}: expected a NumPy .npz archive, got a file that cannot be "
                            f"read ({type(exc).__name__}: {exc})") from None
        members = {name.removesuffix(".npy"): name for name in self._zip.namelist()}
        if images_key not in members:
            raise DataError(f"npz file {str(self.path)!r}: no array named {images_key!r}; expected one, got arrays "
                            f"{list(members)}")
        self.images_key, self._member, self.size = images_key, members[images_key], size
        self._where = f"npz file {str(self.path)!r} array {images_key!r}"
        self._stream = None
        self.shape, self.dtype, self._offset = self._read_header()
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.labels = self._read_labels(members.get(labels_key), labels_key)
        resized = "" if size is None else f", resized to {size} × {size}"
        self.description = (f"npz file {self.path} ({self.shape[0]} images {tuple(self.shape[1:])} {self.dtype}"
                            f"{resized})")

    def _read_header(self) -> tuple[tuple[int, ...], np.dtype, int]:
        try:
            with self._zip.open(self._member) as f:
                version = np.lib.format.read_magic(f)
                reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in reader:
                    raise ValueError(f"unsupported .npy format version {version}")
                shape, fortran_order, dtype = reader[version](f)
                offset = f.tell()
        except READ_ERRORS as exc:
            raise DataError(f"{self._where}: expected a valid .npy array, got {type(exc).__name__}: {exc}") from None
        check_npz_layout(shape, dtype, self._where)
        if fortran_order:
            raise DataError(f"{self._where}: expected a C-ordered array (Fortran-ordered ones cannot be streamed; "
                            "re-save with np.ascontiguousarray), got a Fortran-ordered one")
        return tuple(shape), dtype, offset

    def _read_labels(self, member: str | None, key: str) -> np.ndarray | None:
        if member is None:
            return None
        where = f"npz file {str(self.path)!r} array {key!r}"
        try:
            with self._zip.open(member) as f:
                y = np.lib.format.read_array(f, allow_pickle=False)
        except READ_ERRORS as exc:
            raise DataError(f"{where}: expected a readable integer array, got {type(exc).__name__}: {exc}") from None
        return check_npz_labels(y, self.shape[0], where)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):  # the open zip handles are reopened lazily
        state = self.__dict__.copy()
        state["_zip"], state["_stream"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._zip = zipfile.ZipFile(self.path)

    def read(self, start: int, stop: int) -> Batch:
        self._check_range(start, stop)
        if self._stream is None:
            self._stream = self._zip.open(self._member)
        position = self._offset + start * self._row_bytes
        if self._stream.tell() != position:
            self._stream.seek(position)  # forward: skips; backward: the zip member restarts from its beginning
        count = stop - start
        try:
            raw = self._stream.read(count * self._row_bytes)
        except READ_ERRORS as exc:
            self._stream = None  # a failed zip stream cannot be read on
            raise DataError(f"{self._where}: expected samples {start}…{stop - 1}, got {type(exc).__name__}: {exc} "
                            "(corrupt file?)") from None
        if len(raw) != count * self._row_bytes:
            raise DataError(f"{self._where}: expected samples {start}…{stop - 1}, got a file that ends early "
                            "(truncated file?)")
        array = np.frombuffer(raw, dtype=self.dtype).reshape(count, *self.shape[1:])
        x = resize_images(npz_images_to_tensor(array, f"{self._where} samples {start}…{stop - 1}"), self.size)
        labels = [""] * count if self.labels is None else [str(int(v)) for v in self.labels[start:stop]]
        return Batch(start, x.contiguous(), [str(i) for i in range(start, stop)], labels)

    def integer_labels(self) -> torch.Tensor | None:
        return None if self.labels is None else torch.from_numpy(np.asarray(self.labels, dtype=np.int64))

    def fingerprint(self) -> dict:
        info = self._zip.getinfo(self._member)  # the zip's CRC-32 of the array's bytes: a content check for free
        labels = None if self.labels is None else hashlib.sha256(self.labels.tobytes()).hexdigest()
        fingerprint = {"kind": "npz", "array": self.images_key, "shape": list(self.shape), "dtype": str(self.dtype),
                       "crc32": info.CRC, "labels_sha256": labels}
        if self.size is not None:  # only when resized: runs of earlier versions (own size) still resume
            fingerprint["size"] = self.size
        return fingerprint


class SourceImages(IterableDataset):
    """A source as a PyTorch ``IterableDataset`` of ``(C, H, W)`` images (unreadable ones skipped), read a batch at
    a time — for APIs that take a Dataset (a detector's ``fit`` or ``calibrate``). With ``limit``, at most that
    many samples, evenly spaced over the source. ``positions`` lists the samples the last pass yielded, in order
    (unreadable ones are skipped), so :meth:`labels_read` gives their labels."""

    def __init__(self, source: ImageSource, batch_size: int = 64, limit: int | None = None):
        self.source, self.batch_size, self.limit = source, batch_size, limit
        self.positions: list[int] = []

    def labels_read(self) -> torch.Tensor | None:
        """The source's class indices of the samples the last complete pass yielded, or None without labels."""
        labels = self.source.integer_labels()
        return None if labels is None else labels[torch.tensor(self.positions, dtype=torch.long)]

    def __iter__(self):
        n, read, failures = len(self.source), 0, []
        self.positions = []
        if self.limit is None or n <= self.limit:
            batches = self.source.batches(self.batch_size)
        else:
            spread = np.linspace(0, n - 1, self.limit).round().astype(int).tolist()
            batches = (self.source.read(i, i + 1) for i in spread)
        for batch in batches:
            for position, (image, ok) in enumerate(zip(batch.x, batch.readable.tolist())):
                if ok:
                    read += 1
                    self.positions.append(batch.start + position)
                    yield image
                else:
                    failures.append((batch.ids[position], batch.errors[position]))
        if not read:
            raise DataError(_nothing_readable_message(self.source, failures))


def _nothing_readable_message(source: ImageSource, failures: list[tuple[str, str]]) -> str:
    if isinstance(source, FolderSource):
        return unreadable_folder_message(source.root, len(source), failures)
    return f"data: expected readable images, got none in {source.description}"


def _label_text(label: int, class_names: list[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return class_names[label]
    return str(label)


def fingerprint_digest(fingerprint: dict) -> str:
    """A short stable digest of a fingerprint (for messages)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


EMBEDDED = ("digits", "digits-test")
ZOO_PREFIX = "zoo:"
SSL_ZOO_PREFIX = "ssl-zoo:"  # the SSL zoo: a poisoned SimCLR encoder (--model) and its unlabeled set (--data)


def open_source(data, *, image_size: int | None = None, channels: int = 3, name: str = "data") -> ImageSource:
    """An :class:`ImageSource` for ``data``: a source as is; a tensor or ``ImageDataset`` (in memory); a path to
    an image folder or an ``.npz`` file (streamed); ``"digits"`` / ``"digits-test"`` (the embedded digits'
    training / held-out test split); ``"zoo:<attack>"`` (the poisoned training set of that zoo model, with the
    true poison indices, so the report can score the screening). ``name``: the argument errors name.

    ``image_size`` means the same for every kind: images are resized to ``image_size`` × ``image_size``. None
    keeps the data's own size — for arrays, tensors and the zoo; folders (files of any size) and the embedded
    digits get 32. A source passed as is is not resized."""
    if isinstance(data, ImageSource):
        return data
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image size: expected a positive image side or None, got {image_size!r}")
    if isinstance(data, (torch.Tensor, ImageDataset)):
        return TensorSource(data, size=image_size)
    if not isinstance(data, (str, Path)):
        raise TypeError(f"{name}: expected a path, 'digits', 'digits-test', 'zoo:<attack>', a tensor, an ImageDataset "
                        f"or an ImageSource, got {type(data).__name__}")
    spec = str(data)
    if spec in EMBEDDED:
        from trojanguard.data import load_digits

        train, test = load_digits(size=image_size or DEFAULT_IMAGE_SIZE, channels=channels)
        part = train if spec == "digits" else test
        return TensorSource(part, description=f"embedded digits, {'training' if spec == 'digits' else 'held-out test'}"
                            f" split ({len(part)} images)")
    if spec.startswith(ZOO_PREFIX):
        entry = zoo_entry(spec[len(ZOO_PREFIX):])
        poisoned = entry.train
        return TensorSource(poisoned.dataset, truth=poisoned.is_poisoned, size=image_size,
                            description=f"poisoned training set of zoo model {spec} ({len(poisoned.dataset)} images, "
                                        f"{int(poisoned.is_poisoned.sum())} poisoned)")
    if spec.startswith(SSL_ZOO_PREFIX):
        entry = ssl_zoo_entry(spec[len(SSL_ZOO_PREFIX):])
        poisoned = entry.train
        return TensorSource(poisoned.x, truth=poisoned.is_poisoned, size=image_size,
                            description=f"unlabeled training set of SSL zoo encoder {spec} ({len(poisoned)} images, "
                                        f"{int(poisoned.is_poisoned.sum())} poisoned)")
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{name}: expected an image folder, an .npz file, one of {EMBEDDED} or 'zoo:<attack>', got "
                        f"{spec!r}, which is neither an existing file or folder")
    if path.suffix.lower() == ".npz":
        return NpzSource(path, size=image_size)
    if path.is_dir():
        return FolderSource(path, size=image_size or DEFAULT_IMAGE_SIZE, channels=channels)
    raise DataError(f"{name}: expected an image folder or an .npz file, got {spec!r}, a file that is not an .npz")


@functools.lru_cache(maxsize=4)
def zoo_entry(attack: str):
    """The zoo's backdoored digits model for ``attack`` (trained on first use, then cached on disk; the entry is
    kept in memory too, so the model and its data specs share it)."""
    from trojanguard.attacks import ATTACKS
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    if attack not in ATTACKS:
        raise DataError(f"zoo: unknown attack {attack!r}; expected one of {sorted(ATTACKS)}")
    return get_backdoored_model(ZooConfig(attack=attack), show_progress=False)


@functools.lru_cache(maxsize=4)
def ssl_zoo_entry(attack: str):
    """The SSL zoo's poisoned SimCLR encoder for ``attack`` (``SSLZooConfig(attack=attack)``: trained on first use,
    then cached on disk), kept in memory so ``--model`` and ``--data`` share it."""
    from trojanguard.attacks.ssl import SSL_ATTACKS
    from trojanguard.zoo import SSLZooConfig, get_poisoned_encoder

    if attack not in SSL_ATTACKS:
        raise DataError(f"ssl-zoo: unknown attack {attack!r}; expected one of {sorted(SSL_ATTACKS)}")
    return get_poisoned_encoder(SSLZooConfig(attack=attack), show_progress=False)
