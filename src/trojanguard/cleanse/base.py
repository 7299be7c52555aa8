"""What every cleanser shares: the ``Cleanser`` protocol, its JSON report, and the checks of its input.

A cleanser takes a suspicious model and unlabeled images and returns a *new* model; ``cleanser.report`` then
holds what happened (per-epoch loss, and CA / ASR per epoch when the caller passed an evaluation, see
:mod:`trojanguard.cleanse.evaluation`). The caller's model is never modified. Methods train with the one loop of
:mod:`trojanguard.cleanse._training`, feeding it their own per-batch step.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from trojanguard.data.core import ImageDataset, check_images
from trojanguard.data.user import load_image_path
from trojanguard.errors import DataError, TrojanGuardError
from trojanguard.models.adapters import Classifier
from trojanguard.models.features import model_device as any_model_device

MIN_IMAGES = 100  # fewer unlabeled images cannot carry a classifier's clean behaviour: refuse
RECOMMENDED_MIN_IMAGES = 500  # METHODS.md §3: 500–2000 images keep BCU intact on a CPU; warn below
PREFLIGHT_IMAGES = 2  # images of the data the models run on before training (shape / device / NaN check)


class CleanseError(TrojanGuardError, RuntimeError):
    """Cleansing cannot run or did not converge (model on an unusable device, NaN / infinite loss)."""


# ---------------------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class Column:
    """How a row's extra value shows: ``header`` in the printed table (``width`` characters), ``symbol`` in error
    messages, ``format`` its format spec (without width)."""

    header: str
    symbol: str
    width: int
    format: str


EXTRA_COLUMNS: dict[str, Column] = {"temperature": Column("tau", "τ", 5, ".2f")}  # distillation temperature


def extra_column(name: str) -> Column:
    """How the extra value ``name`` shows (``EXTRA_COLUMNS``, else its name and a general number format)."""
    return EXTRA_COLUMNS.get(name) or Column(name[:10], name, max(10, len(name[:10])), ".4g")


@dataclass
class EpochRow:
    """One training epoch: mean loss, learning rate, seconds, evaluation metrics, and the method's own per-epoch
    values in ``extras`` (BCU: the distillation temperature τ; parts of a composite loss)."""

    epoch: int
    loss: float
    lr: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The row as the JSON report holds it: the extras flat, after the loss."""
        return {"epoch": self.epoch, "loss": self.loss, **self.extras, "lr": self.lr, "seconds": self.seconds,
                "metrics": dict(self.metrics)}


@dataclass
class CleanseReport:
    """What a cleanser did. ``before`` / ``after``: evaluation metrics of the input and the returned model
    (empty without an evaluation); ``details``: method-specific facts (BCU: the per-layer ratios)."""

    method: str
    config: dict[str, object]
    images: int = 0
    seconds: float = 0.0
    epochs: list[EpochRow] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["epochs"] = [row.to_dict() for row in self.epochs]
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    def format(self) -> str:
        """A short human-readable table: per-epoch loss (and metrics), then before / after."""
        names = sorted({k for row in self.epochs for k in row.metrics})
        columns = [(name, extra_column(name)) for name in dict.fromkeys(k for row in self.epochs for k in row.extras)]
        lines = [f"{self.method}: {self.images} unlabeled images, {len(self.epochs)} epochs, {self.seconds:.1f}s",
                 f"{'epoch':>5s}" + "".join(f" {c.header:>{c.width}s}" for _, c in columns) + f" {'lr':>8s} {'loss':>9s}"
                 + "".join(f" {n[:14]:>14s}" for n in names)]
        for row in self.epochs:
            lines.append(f"{row.epoch:5d}"
                         + "".join(f" {row.extras.get(k, float('nan')):{c.width}{c.format}}" for k, c in columns)
                         + f" {row.lr:8.5f} {row.loss:9.5f}"
                         + "".join(f" {row.metrics.get(n, float('nan')):14.4f}" for n in names))
        if self.before or self.after:
            keys = sorted(set(self.before) | set(self.after))
            lines.append("before: " + ", ".join(f"{k}={self.before.get(k, float('nan')):.4f}" for k in keys))
            lines.append("after:  " + ", ".join(f"{k}={self.after.get(k, float('nan')):.4f}" for k in keys))
        lines += [f"warning: {w}" for w in self.details.get("warnings", [])]
        lines += [f"note: {n}" for n in self.details.get("notes", [])]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# the protocol


class Cleanser:
    """Base of every cleanser: ``cleanse(model, data) -> nn.Module`` (a new model), then ``report``.

    A cleanser keeps its hyperparameters in ``config`` (a frozen dataclass); they read as attributes
    (``bcu.epochs``), and ``repr`` and the report's config list every field."""

    config: Any = None
    report: CleanseReport | None = None
    model_kind: type | None = None  # the kind of model cleanse() takes (trojanguard.models: Classifier, Encoder, ...)

    def cleanse(self, model: nn.Module, data, *,
                evaluation: Callable[[nn.Module], dict[str, float]] | None = None) -> nn.Module:
        """A new, cleansed model; ``evaluation(model) -> metrics`` (see :mod:`trojanguard.cleanse.evaluation`),
        when given, measures the input and the result into ``report.before`` / ``report.after``."""
        raise NotImplementedError

    def __getattr__(self, name: str):  # only called for names not found the usual way
        config = self.__dict__.get("config")
        if config is not None and name in config_field_names(config):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        config = self.__dict__.get("config")
        if config is not None and name in config_field_names(config):
            raise AttributeError(f"{name}: the settings of a {type(self).__name__} are fixed at construction; "
                                 f"build a new one ({type(self).__name__}(config=dataclasses.replace("
                                 f"cleanser.config, {name}=...)))")
        super().__setattr__(name, value)

    def report_config(self) -> dict[str, object]:
        """The report's ``config``: every config field not marked ``report=False``; values JSON cannot hold as
        they are (callables, lists of ratios) as their ``repr``."""
        return {f.name: _report_value(getattr(self.config, f.name)) for f in fields(self.config)
                if f.metadata.get("report", True)}

    def __repr__(self) -> str:
        settings = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in fields(self.config))
        return f"{type(self).__name__}({settings})"


def setting(default, help: str, **metadata):
    """A config field with its default and the help text the CLI shows (``metadata``: ``choices``, ``parse``
    for text given on the command line, ``report=False`` to leave it out of the report's config)."""
    return field(default=default, metadata={"help": help, **metadata})


def config_field_names(config) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config))


def config_with(config_type: type, config, settings: dict[str, object], *, owner: str):
    """``config`` (default: ``config_type()``) with ``settings`` replacing its fields; a keyword that is no field
    is refused with the list of those that are."""
    unknown = sorted(set(settings) - {f.name for f in fields(config_type)})
    if unknown:
        raise TypeError(f"{owner}: unexpected keyword argument(s) {', '.join(unknown)}; expected config= or any of "
                        f"{', '.join(f.name for f in fields(config_type))}")
    if config is None:
        return config_type(**settings)
    if not isinstance(config, config_type):
        raise TypeError(f"config: expected a {config_type.__name__}, got {type(config).__name__}")
    return replace(config, **settings) if settings else config


def _report_value(value):
    """A config value as the JSON report holds it: plain numbers, strings, None and tuples of them as they are;
    anything else (a callable, a list of ratios) as its repr."""
    plain = (str, int, float, type(None))
    if isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value)):
        return value
    return repr(value)


# ---------------------------------------------------------------------------------------------------------
# input checks


def copy_of(model: nn.Module, why: str) -> nn.Module:
    """A deep copy of the caller's model (cleansers never change it); a one-line CleanseError when it cannot be
    copied. ``why``: what the method needs the copy for ("BCU needs a frozen teacher copy")."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 — whatever deepcopy raises: the model cannot be used
        raise CleanseError(f"model: it cannot be copied (copy.deepcopy failed: {exc}); {why} and never changes your "
                           "model") from None


def model_device(model: nn.Module) -> torch.device:
    """The one device holding ``model``'s parameters and buffers; a CleanseError when there is none usable."""
    return any_model_device(model, strict=CleanseError, purpose="to cleanse")


def _images_of(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


class UnlabeledImages:
    """The unlabeled images of a cleanser: a tensor ``(N, C, H, W)`` in [0, 1], an :class:`ImageDataset`,
    a ``Dataset`` of images or ``(image, label, ...)`` tuples, a ``DataLoader``, or the path of an image folder
    or ``.npz`` file (read whole). Labels are ignored.

    Tensors, ImageDatasets and map-style Datasets are reshuffled every epoch by a seeded generator; a
    DataLoader keeps its own batching and order. ``minimum`` / ``recommended``: how many images the method
    refuses below / warns below (:func:`check_count`).
    """

    def __init__(self, data, batch_size: int, seed: int, *, minimum: int = MIN_IMAGES,
                 recommended: int = RECOMMENDED_MIN_IMAGES):
        if batch_size < 2:
            raise ValueError(f"batch_size: expected at least 2 (batch normalisation needs it), got {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.minimum, self.recommended = minimum, recommended
        self.x: torch.Tensor | None = None
        self.loader: DataLoader | None = None
        if isinstance(data, (str, Path)):
            data = load_image_path(data, "data")
        if isinstance(data, ImageDataset):
            data = data.x
        if isinstance(data, torch.Tensor):
            self.x = check_images(data, "data")
        elif isinstance(data, DataLoader):
            self.loader = data
        elif isinstance(data, Dataset):
            shuffle = not isinstance(data, IterableDataset)
            self.loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                                     generator=torch.Generator().manual_seed(seed) if shuffle else None)
        else:
            raise DataError(f"data: expected a tensor (N, C, H, W), an ImageDataset, a Dataset or a DataLoader, "
                            f"got {type(data).__name__}")
        self.count = self._count()
        if self.count is not None:
            check_count(self.count, minimum, recommended)

    def _count(self) -> int | None:
        if self.x is not None:
            return len(self.x)
        try:
            return len(self.loader.dataset)  # type: ignore[union-attr, arg-type]
        except TypeError:
            return None

    def sample(self, count: int = PREFLIGHT_IMAGES) -> torch.Tensor:
        """Up to ``count`` images of the data (a seeded random subset of a tensor; the first batches of a loader),
        without consuming an epoch's randomness. For the preflight run and the normalisation-gap measurement."""
        if self.x is not None:
            if len(self.x) == 0:
                raise DataError("data: it holds no images")
            if count <= PREFLIGHT_IMAGES:
                return self.x[:count]
            pick = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed))[:count]
            return self.x[pick.sort().values]
        batches, total = [], 0
        for item in self.loader:  # type: ignore[union-attr]
            batches.append(check_images(_images_of(item), "data (first batch)"))
            total += len(batches[-1])
            if total >= count:
                break
        if not batches:
            raise DataError("data: it holds no images")
        return torch.cat(batches)[:count]

    def epoch(self, epoch: int, paired: torch.Tensor | None = None) -> Iterator:
        """The batches of one epoch; a final batch of a single image is skipped (batch norm cannot train on it).
        ``paired`` (tensor data only): one row per image; the batches are then ``(images, their rows)``."""
        if paired is not None and (self.x is None or len(paired) != len(self.x)):
            raise ValueError("paired: expected one row per image of a tensor data set")
        if self.x is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.x), generator=gen)
            picks = (order[i : i + self.batch_size] for i in range(0, len(self.x), self.batch_size))
            batches = (self.x[pick] if paired is None else (self.x[pick], paired[pick]) for pick in picks)
        else:
            batches = (check_images(_images_of(item), "data batch") for item in self.loader)  # type: ignore
        for batch in batches:
            if len(batch[0] if isinstance(batch, tuple) else batch) >= 2:
                yield batch


def check_count(n: int, minimum: int = MIN_IMAGES, recommended: int = RECOMMENDED_MIN_IMAGES) -> None:
    if n < minimum:
        raise DataError(f"data: {n} image(s) are too few to cleanse a model; expected at least {minimum} "
                        f"unlabeled images (at least {recommended} recommended)")
    if n < recommended:
        warnings.warn(f"data: only {n} unlabeled images; cleansing is more reliable with at least "
                      f"{recommended}", stacklevel=3)


def preflight(model: nn.Module, sample: torch.Tensor, device: torch.device) -> int:
    """Run ``model`` on a few images of the data (``sample`` moved to ``device``) before any training; return its
    number of classes. The :class:`~trojanguard.models.Classifier` kind's check: a one-line DataError when the
    images do not fit the model or its output is not logits ``(N, K ≥ 2)``; CleanseError for non-finite logits."""
    return Classifier(model).check(sample.to(device), non_finite=CleanseError)
