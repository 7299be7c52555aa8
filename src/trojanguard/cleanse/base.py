"""What every cleanser shares: the ``Cleanser`` protocol, its JSON report, input checks, and the
teacher → student knowledge-distillation loop (KL on softened logits, no labels).

A cleanser takes a suspicious classifier and unlabeled images and returns a *new* model;
``cleanser.report`` then holds what happened (per-epoch loss, and CA / ASR per epoch when the caller
passed an :class:`Evaluation`). The caller's model is never modified.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from trojanguard.data.core import ImageDataset, check_images
from trojanguard.errors import DataError, TrojanGuardError
from trojanguard.metrics import attack_success_rate, clean_accuracy
from trojanguard.models.features import model_device as any_model_device
from trojanguard.progress import progress

MIN_IMAGES = 100  # fewer unlabeled images cannot carry a classifier's clean behaviour: refuse
RECOMMENDED_MIN_IMAGES = 500  # METHODS.md §3: 500–2000 images keep BCU intact on a CPU; warn below
PREFLIGHT_IMAGES = 2  # images of the data the models run on before training (shape / device / NaN check)
AUGMENTATIONS = ("crop_flip", "crop", "none")
CROP_PAD_FRACTION = 0.125  # random-crop padding as a fraction of the side: the authors' 4 px at 32 px


class CleanseError(TrojanGuardError, RuntimeError):
    """Cleansing cannot run or did not converge (model on an unusable device, NaN / infinite loss)."""


# ---------------------------------------------------------------------------------------------------------
# report


@dataclass
class EpochRow:
    """One distillation epoch: mean KL loss, temperature τ, learning rate, seconds and evaluation metrics."""

    epoch: int
    loss: float
    temperature: float
    lr: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CleanseReport:
    """What a cleanser did. ``before`` / ``after``: evaluation metrics of the input and the returned model
    (empty without an :class:`Evaluation`); ``details``: method-specific facts (BCU: the per-layer ratios)."""

    method: str
    config: dict[str, object]
    images: int = 0
    seconds: float = 0.0
    epochs: list[EpochRow] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

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
        lines = [f"{self.method}: {self.images} unlabeled images, {len(self.epochs)} epochs, {self.seconds:.1f}s",
                 f"{'epoch':>5s} {'tau':>5s} {'lr':>8s} {'loss':>9s}" + "".join(f" {n[:14]:>14s}" for n in names)]
        for row in self.epochs:
            lines.append(f"{row.epoch:5d} {row.temperature:5.2f} {row.lr:8.5f} {row.loss:9.5f}"
                         + "".join(f" {row.metrics.get(n, float('nan')):14.4f}" for n in names))
        if self.before or self.after:
            keys = sorted(set(self.before) | set(self.after))
            lines.append("before: " + ", ".join(f"{k}={self.before.get(k, float('nan')):.4f}" for k in keys))
            lines.append("after:  " + ", ".join(f"{k}={self.after.get(k, float('nan')):.4f}" for k in keys))
        lines += [f"warning: {w}" for w in self.details.get("warnings", [])]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# evaluation


class Evaluation:
    """Labelled clean images and a trigger, to measure CA (and ASR) of a model during cleansing.

    ``x: (N, C, H, W)`` in [0, 1], ``y: (N,)``. ``trigger``: the triggered images ``(N, C, H, W)``, an attack
    (anything with ``apply(x)``, e.g. :class:`trojanguard.attacks.BadNets`) or a callable ``x -> x_triggered``;
    with a trigger, ``target`` (the attack's target class) is required and ASR is reported.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, trigger=None, target: int | None = None):
        self.x = check_images(x, "Evaluation.x")
        if not isinstance(y, torch.Tensor) or y.shape != (len(x),):
            raise DataError(f"Evaluation.y: expected a tensor of shape ({len(x)},), got "
                            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        self.y = y.long()
        self.x_triggered: torch.Tensor | None = None
        self.target = target
        if trigger is not None:
            if target is None:
                raise DataError("Evaluation.target: a trigger was given, so the attack's target class is needed")
            if isinstance(trigger, torch.Tensor):
                triggered = trigger
            elif hasattr(trigger, "apply_test"):
                triggered = trigger.apply_test(x)
            elif hasattr(trigger, "apply"):
                triggered = trigger.apply(x)
            elif callable(trigger):
                triggered = trigger(x)
            else:
                raise DataError(f"Evaluation.trigger: expected triggered images, an attack or a callable, "
                                f"got {type(trigger).__name__}")
            self.x_triggered = check_images(triggered, "Evaluation.trigger")
            if self.x_triggered.shape != self.x.shape:
                raise DataError(f"Evaluation.trigger: expected triggered images of shape {tuple(self.x.shape)}, "
                                f"got {tuple(self.x_triggered.shape)}")

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out = {"clean_accuracy": clean_accuracy(model, self.x, self.y)}
        if self.x_triggered is not None:
            out["attack_success_rate"] = attack_success_rate(model, self.x_triggered, self.y, int(self.target))
        return out


# ---------------------------------------------------------------------------------------------------------
# the protocol


class Cleanser:
    """Base of every cleanser: ``cleanse(model, data) -> nn.Module`` (a new model), then ``report``.

    A cleanser keeps its hyperparameters in ``config`` (a frozen dataclass); they read as attributes
    (``bcu.epochs``), and ``repr`` and the report's config list every field."""

    config: Any = None
    report: CleanseReport | None = None

    def cleanse(self, model: nn.Module, data, *, evaluation: Evaluation | None = None) -> nn.Module:
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


def model_device(model: nn.Module) -> torch.device:
    """The one device holding ``model``'s parameters and buffers; a CleanseError when there is none usable."""
    return any_model_device(model, strict=CleanseError, purpose="to cleanse")


def _images_of(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _first_layer_hint(model: nn.Module) -> str:
    """What the model's first convolution or linear layer expects, for error messages."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return f"its first convolution expects {module.in_channels} input channels"
        if isinstance(module, nn.Linear):
            return f"its first linear layer expects {module.in_features} input features"
    return "see the model's first layer"


class UnlabeledImages:
    """The unlabeled images of a cleanser: a tensor ``(N, C, H, W)`` in [0, 1], an :class:`ImageDataset`,
    a ``Dataset`` of images or ``(image, label, ...)`` tuples, or a ``DataLoader``. Labels are ignored.

    Tensors, ImageDatasets and map-style Datasets are reshuffled every epoch by a seeded generator; a
    DataLoader keeps its own batching and order.
    """

    def __init__(self, data, batch_size: int, seed: int):
        if batch_size < 2:
            raise ValueError(f"batch_size: expected at least 2 (batch normalisation needs it), got {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.x: torch.Tensor | None = None
        self.loader: DataLoader | None = None
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
            check_count(self.count)

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

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        """The batches of one epoch; a final batch of a single image is skipped (batch norm cannot train on it)."""
        if self.x is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.x), generator=gen)
            batches = (self.x[order[i : i + self.batch_size]] for i in range(0, len(self.x), self.batch_size))
        else:
            batches = (check_images(_images_of(item), "data batch") for item in self.loader)  # type: ignore
        for x in batches:
            if len(x) >= 2:
                yield x


def check_count(n: int) -> None:
    if n < MIN_IMAGES:
        raise DataError(f"data: {n} image(s) are too few to cleanse a model; expected at least {MIN_IMAGES} "
                        f"unlabeled images (about {RECOMMENDED_MIN_IMAGES}–2000 recommended)")
    if n < RECOMMENDED_MIN_IMAGES:
        warnings.warn(f"data: only {n} unlabeled images; cleansing is more reliable with at least "
                      f"{RECOMMENDED_MIN_IMAGES}", stacklevel=3)


@torch.no_grad()
def preflight(model: nn.Module, sample: torch.Tensor, device: torch.device) -> int:
    """Run ``model`` (eval mode) on a few images of the data; return its number of classes.

    Fails before any training with an error naming the problem: the model cannot take the data's image
    size or channels, its output is not logits ``(N, K)``, or its logits are not finite.
    """
    shape = tuple(sample.shape[1:])
    try:
        out = model(sample.to(device))
    except Exception as exc:  # noqa: BLE001 — any failure here means the data does not fit the model
        raise DataError(f"data: the model cannot run on images of shape {shape} (C, H, W) from the data — "
                        f"{_first_layer_hint(model)}; the model said: {type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(sample) or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"model output: expected logits of shape (N, num_classes ≥ 2) for images of shape {shape}, "
                        f"got {got}")
    if not torch.isfinite(out).all():
        raise CleanseError("model: it returns NaN or infinite logits on the data, so there is nothing to distil "
                           "from; check its weights and the data's range ([0, 1] pixels)")
    return int(out.shape[1])


# ---------------------------------------------------------------------------------------------------------
# augmentation


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, *, flip: bool = True) -> torch.Tensor:
    """Per-image random crop with zero padding (``CROP_PAD_FRACTION`` of the side) and horizontal flip.

    ``x: (B, C, H, W)`` → same shape; drawn from ``gen`` on the CPU so runs are reproducible.
    """
    b, c, h, w = x.shape
    pad = max(1, round(CROP_PAD_FRACTION * min(h, w)))
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
                 rows, cols]
    if flip:
        flips = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


def make_augment(augment) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """``'crop_flip'``, ``'crop'``, ``'none'`` / None, or a callable ``x -> x`` (applied to each batch)."""
    if augment is None or augment == "none":
        return None
    if augment == "crop_flip":
        return lambda x, gen: random_crop_flip(x, gen, flip=True)
    if augment == "crop":
        return lambda x, gen: random_crop_flip(x, gen, flip=False)
    if callable(augment):
        return lambda x, gen: augment(x)
    raise ValueError(f"augment: expected one of {AUGMENTATIONS} or a callable x -> x, got {augment!r}")


# ---------------------------------------------------------------------------------------------------------
# distillation


def temperature_at(epoch: int, epochs: int, temperature: tuple[float, float]) -> float:
    """τ for 0-based ``epoch``: linear from ``τ0`` to ``τ1`` reached at the last epoch (authors: 1 + 3(e+1)/E)."""
    start, end = temperature
    return start + (end - start) * (epoch + 1) / epochs


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(T/τ) ‖ softmax(S/τ)), batch mean, no τ² factor (METHODS.md §3). Logits: (B, K)."""
    return F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                    reduction="batchmean", log_target=True)


def logit_matching_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean squared difference of the logits (Ba & Caruana 2014; τ unused). Logits: (B, K).

    On out-of-distribution data the teacher is often confident, and a softmax then hides all but its top
    logit; matching the logits transfers the whole output (measured on the digits zoo with photo edge maps,
    BadNets: CA 0.877 with KL, 0.955 with logit matching; benchmarks/RESULTS.md)."""
    return (student_logits - teacher_logits).pow(2).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kl": distillation_loss, "mse": logit_matching_loss}


@dataclass(frozen=True)
class DistillSettings:
    """The distillation loop's hyperparameters (authors' values; METHODS.md §3)."""

    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: tuple[float, float] = (1.0, 4.0)
    norm_stats: str = "update"
    max_grad_norm: float | None = None
    loss: str = "kl"


NORM_STATS = ("auto", "keep", "update")
AGREEMENT_KEEP = 0.9  # norm_stats="auto" keeps the teacher's statistics when fewer of the data's predictions than
# this survive batch statistics (see batch_statistics_agreement; measured, benchmarks/RESULTS.md: held-out training
# and test images 0.977–1.000 on the small CNN and a CIFAR ResNet-18, adapted photo crops 0.555–0.688, raw 0.336–0.676)
AGREEMENT_BATCH = 64  # images per batch whose statistics batch_statistics_agreement normalises with
KEEP_MAX_GRAD_NORM = 5.0  # max_grad_norm="auto" with kept statistics: eval-mode batch norm amplifies far
# out-of-distribution inputs (running variance ~1e-3 in some channels) and unclipped SGD diverged once (KL, grey
# photos: CA 0.106); a bound of 1.0 held learning back (Blended on edge maps: ASR 0.50 left; 5.0: ASR 0.02)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_normalisation(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


@torch.no_grad()
def normalisation_gap(model: nn.Module, x: torch.Tensor) -> float | None:
    """How far the data's feature statistics lie from those the model's batch-norm layers recorded in training.

    For every batch-norm layer with running statistics: the RMS over channels of the batch mean's distance to
    the running mean in running standard deviations, plus the mean |log| ratio of batch to running standard
    deviation (the statistics DeepInversion matches); averaged over layers. ~0 on the training distribution,
    growing with the shift; None when the model has no such layer. ``x: (N, C, H, W)`` on the model's device.
    """
    gaps: list[float] = []

    def hook(module, inputs, _output):
        a = inputs[0].transpose(0, 1).flatten(1).float()
        std = (module.running_var + module.eps).sqrt()
        shift = ((a.mean(1) - module.running_mean) / std).pow(2).mean().sqrt()
        scale = (a.std(1, unbiased=False) / std).clamp_min(1e-6).log().abs().mean()
        gaps.append(float(shift + scale))

    layers = _running_stat_norms(model)
    hooked_eval_pass(model, x, [m.register_forward_hook(hook) for m in layers])
    return sum(gaps) / len(gaps) if gaps else None


def hooked_eval_pass(model: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One eval-mode forward pass of ``model`` on ``x`` for the ``hooks`` (handles) registered on it; the hooks
    are removed and every module's train/eval mode is restored afterwards, whatever happens."""
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag


def _running_stat_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None]


@torch.no_grad()
def batch_statistics_agreement(model: nn.Module, x: torch.Tensor, batch_size: int = AGREEMENT_BATCH) -> float | None:
    """Share of the images ``x`` whose predicted class is the same when batch norm normalises with its running
    statistics (eval mode) and with the statistics of the data's own batches of ``batch_size`` (train mode, as
    training on the data would). None when the model has no batch norm with running statistics.

    Training with batch norm in train mode replaces the teacher's statistics by the data's; this measures, before
    any training, whether that alone changes what the model computes. Near the training distribution the
    statistics agree and so do the predictions (0.977–1.000 on the digits zoo, small CNN and ResNet-18); on far
    data they do not (adapted photo crops 0.555–0.688). Unlike :func:`normalisation_gap` it is a share of
    predictions, so it does not grow with depth the way eval-mode statistics drift (0.06–0.12 in-distribution on
    the small CNN, 0.20 on the ResNet-18), and it does not depend on a reference input. Only batch-norm layers
    change mode (dropout stays off); the model is not modified. ``x: (N, C, H, W)`` on the model's device."""
    if not _running_stat_norms(model):
        return None
    probe = copy.deepcopy(model).eval()  # train-mode batch norm updates running statistics: never on the model
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    batches = [b for b in batches if len(b) >= 2]  # batch statistics need two images
    if not batches:
        return None
    running = torch.cat([probe(b).argmax(1) for b in batches])
    for module in _running_stat_norms(probe):
        module.train()
    batch = torch.cat([probe(b).argmax(1) for b in batches])
    return float((running == batch).double().mean())


def _train_mode(student: nn.Module, norm_stats: str) -> None:
    """Student in train mode; with ``norm_stats='keep'`` normalisation layers stay in eval mode, so batch norm
    normalises with (and keeps) the teacher's running statistics instead of those of the distillation data."""
    student.train()
    if norm_stats == "keep":
        for module in student.modules():
            if is_normalisation(module):
                module.eval()


def distill(student: nn.Module, teacher: nn.Module, data: UnlabeledImages, settings: DistillSettings, *,
            device: torch.device, seed: int, augment=None,
            evaluation: Callable[[nn.Module], dict[str, float]] | None = None,
            show_progress: bool = True, desc: str = "distil") -> tuple[list[EpochRow], int, list[float]]:
    """Train ``student`` (train mode) to match the frozen ``teacher`` (eval mode) on unlabeled batches.

    SGD + momentum + weight decay, cosine learning rate over the epochs (stepped per epoch), temperature
    ramped per epoch; ``augment`` is applied once per batch and the *same* augmented images go to teacher
    and student. Returns the per-epoch rows and the number of images seen in one epoch. A non-finite loss
    stops training with :class:`CleanseError` (no half-trained model is returned). Also returns the share of
    the first epoch's images the teacher assigns to each class (a diagnostic: see :func:`dominant_class_warning`).
    """
    teacher.eval().requires_grad_(False)
    _train_mode(student, settings.norm_stats)
    student.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    aug_gen = torch.Generator().manual_seed(seed + 17)
    rows: list[EpochRow] = []
    seen = 0
    class_counts: torch.Tensor | None = None
    epochs = progress(range(settings.epochs), desc=desc, enable=show_progress, total=settings.epochs)
    for epoch in epochs:
        start = time.perf_counter()
        tau = temperature_at(epoch, settings.epochs, settings.temperature)
        lr = opt.param_groups[0]["lr"]
        total, seen = 0.0, 0
        for step, x in enumerate(data.epoch(epoch)):
            x = x.to(device, non_blocking=True)
            if augment is not None:
                x = augment(x, aug_gen)
            with torch.no_grad():
                target = teacher(x)
            if epoch == 0:
                counts = torch.bincount(target.argmax(1).cpu(), minlength=target.shape[1])
                class_counts = counts if class_counts is None else class_counts + counts
            loss = LOSSES[settings.loss](student(x), target, tau)
            if not torch.isfinite(loss):
                raise CleanseError(f"distillation loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                                   f"(lr {lr:g}, τ {tau:.2f}); training diverged — lower lr, or check the model "
                                   "and data for NaN / infinite values. No model is returned.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            total += loss.item() * len(x)
            seen += len(x)
        if seen == 0:
            raise DataError("data: an epoch yielded no batch of at least 2 images")
        if epoch == 0 and data.count is None:
            check_count(seen)
        sched.step()
        metrics: dict[str, float] = {}
        if evaluation is not None:
            metrics = evaluation(student)
            _train_mode(student, settings.norm_stats)
        rows.append(EpochRow(epoch + 1, total / seen, tau, lr, time.perf_counter() - start, metrics))
        if hasattr(epochs, "set_postfix"):
            epochs.set_postfix(loss=f"{total / seen:.4f}", **{k[:3]: f"{v:.3f}" for k, v in metrics.items()})
    for name, tensor in student.state_dict().items():  # buffers too: batch-norm statistics can overflow alone
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CleanseError(f"the cleansed model holds NaN or infinite values in {name!r} after training "
                               f"(lr {settings.lr:g}); training diverged — lower lr. No model is returned.")
    shares = [] if class_counts is None else (class_counts.double() / class_counts.sum()).tolist()
    return rows, seen, shares


def far_data_warning(agreement: float | None, recipe_forced: bool = False) -> str | None:
    """A warning when the unlabeled data lies far from the model's training distribution (batch-statistics
    agreement below ``AGREEMENT_KEEP``). Distillation carries over whatever the teacher does on the data, and on far
    data a teacher can respond to trigger-like features everywhere: measured on the digits zoo, natural-photo crops
    removed BadNets and Blended but left WaNet and Trojan (benchmarks/RESULTS.md), while a student distilled on the
    same crops from a clean teacher has no backdoor."""
    if agreement is None or agreement >= AGREEMENT_KEEP:
        return None
    recipe = "" if recipe_forced else "; BCU switched to its out-of-distribution recipe"
    return (f"data: it looks out-of-distribution for this model (batch-statistics agreement {agreement:.2f} < "
            f"{AGREEMENT_KEEP}){recipe}. On such data BCU removes some backdoors but not others (digits zoo: WaNet and "
            "Trojan stayed): prefer in-distribution images, and test the cleansed model against any trigger you suspect")


DOMINANT_CLASS_SHARE = 0.5  # warn when the teacher puts more of the unlabeled data than this into one class


def dominant_class_warning(shares: list[float]) -> str | None:
    """A warning when the teacher assigns most of the unlabeled data to one class. On data that resembles a
    trigger (e.g. textured photos for a blended-noise backdoor) a backdoored model predicts its target class,
    and distillation then copies the backdoor: measured on the digits zoo, Blended sends 70 % of natural-photo
    crops to its target and BCU on them keeps ASR at 1.0."""
    if len(shares) < 3 or max(shares) <= DOMINANT_CLASS_SHARE:
        return None
    top = max(range(len(shares)), key=shares.__getitem__)
    return (f"data: the model assigns {100 * shares[top]:.0f}% of the unlabeled images to class {top}; if class {top} "
            "is a backdoor target, distilling on these images carries the backdoor over — prefer in-distribution data")

