"""SimCLR (Chen et al., ICML 2020): contrast two augmented views of each image with the NT-Xent loss.

A backbone ``x -> (N, D)`` feeds a projection head (an MLP) whose output the loss sees; the head is kept
apart and dropped after training, as in the paper: users get the backbone, an
:class:`~trojanguard.models.Encoder`. Training runs through the SDK's one loop
(:func:`trojanguard.cleanse._training.train`: progress, non-finite checks, per-epoch rows and evaluation);
this module contributes the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.cleanse._training import train
from trojanguard.cleanse.base import EpochRow
from trojanguard.data.core import ImageDataset, check_images
from trojanguard.errors import DataError, check_positive_int
from trojanguard.models.adapters import Encoder, as_encoder
from trojanguard.ssl.augment import SimCLRAugmentation
from trojanguard.ssl.backbones import build_backbone

MIN_BATCH = 2  # NT-Xent needs at least one negative per anchor, and batch norm two images


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy), SimCLR's loss, averaged over all 2N anchors.

    ``z_a, z_b: (N, D)``: projections of two views of the same N images. For each of the 2N vectors, the other
    view of its image is the positive and the remaining 2N − 2 are negatives; the loss is the cross entropy of
    the cosine similarities divided by ``temperature``. Written here (a few lines) rather than taken from a
    metric-learning library: no dependency earns its place for it.
    """
    if z_a.dim() != 2 or z_a.shape != z_b.shape:
        raise DataError(f"z_a, z_b: expected two (N, D) projections of the same shape, got {tuple(z_a.shape)} and "
                        f"{tuple(z_b.shape)}")
    if len(z_a) < MIN_BATCH:
        raise DataError(f"z_a: expected at least {MIN_BATCH} images (one negative per anchor), got {len(z_a)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    n = len(z_a)
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    similarity = (z @ z.T) / temperature
    similarity = similarity.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, positives)


class ProjectionHead(nn.Sequential):
    """SimCLR's projection: ``Linear(D, hidden) → BatchNorm → ReLU → Linear(hidden, out)``; trained, then dropped."""

    def __init__(self, in_features: int, hidden: int = 256, out_features: int = 64):
        super().__init__(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features))


class SimCLRModel(nn.Module):
    """A backbone and its projection head, trained together; ``forward`` gives the backbone's features (N, D)
    (what an evaluation measures), ``project`` the head's output (what the loss sees)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR's settings, sized for small images on a CPU (the paper: batch 4096, LARS, 100+ epochs at 224 px)."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-6
    temperature: float = 0.5
    projection_hidden: int = 256
    projection_dim: int = 64
    augmentation: SimCLRAugmentation = field(default_factory=SimCLRAugmentation)
    seed: int = 0

    def __post_init__(self):
        check_positive_int("epochs", self.epochs)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < MIN_BATCH:
            raise ValueError(f"batch_size: expected an integer ≥ {MIN_BATCH}, got {self.batch_size}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")


@dataclass
class SimCLRResult:
    """What :func:`train_simclr` returns: the trained backbone as an Encoder (eval mode), the projection head
    (for continued training; not needed for features) and one row per epoch (mean NT-Xent loss, seconds, the
    evaluation's metrics)."""

    encoder: Encoder
    head: nn.Module
    rows: list[EpochRow]


class _ShuffledBatches:
    """Images ``(N, C, H, W)`` in batches, reshuffled every epoch by a seeded generator (the loop's ``epoch(e)``);
    a last batch below MIN_BATCH images is dropped (NT-Xent and batch norm need two)."""

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int):
        self.x, self.batch_size, self.seed = x, batch_size, seed

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        for start in range(0, len(self.x), self.batch_size):
            batch = self.x[order[start : start + self.batch_size]]
            if len(batch) >= MIN_BATCH:
                yield batch


def train_simclr(data: torch.Tensor | ImageDataset, backbone: nn.Module | str = "small_cnn",
                 config: SimCLRConfig | None = None, *, device: torch.device | str = "cpu",
                 evaluation: Callable[[nn.Module], dict[str, float]] | None = None,
                 show_progress: bool = True) -> SimCLRResult:
    """Train ``backbone`` (a module ``x -> (N, D)``, or an architecture name for :func:`build_backbone`) with
    SimCLR on unlabeled images ``data: (N, C, H, W)`` in [0, 1] (an ImageDataset's labels are ignored).

    Adam with a cosine schedule over the epochs; ``evaluation(model)`` (e.g. a
    :class:`~trojanguard.cleanse.evaluation.LinearProbeEvaluation`) runs after each epoch on the backbone's
    features. The head's input size is read from the backbone's output on two images.
    """
    config = config or SimCLRConfig()
    x = check_images(data.x if isinstance(data, ImageDataset) else data, "data")
    if len(x) < MIN_BATCH:
        raise DataError(f"data: expected at least {MIN_BATCH} images, got {len(x)}")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    if isinstance(backbone, str):
        backbone = build_backbone(backbone, in_channels=x.shape[1])
    backbone = backbone.to(device)
    dim = as_encoder(backbone).check(x[:MIN_BATCH], argument="backbone", needed_by="SimCLR")
    model = SimCLRModel(backbone, ProjectionHead(dim, config.projection_hidden, config.projection_dim)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    augment = config.augmentation

    def step(batch: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        view_a, view_b = augment(batch, generator), augment(batch, generator)
        return nt_xent(model.project(view_a), model.project(view_b), config.temperature)

    model.train()
    trained = train(model, step, _ShuffledBatches(x, config.batch_size, config.seed), optimizer=optimizer,
                    scheduler=scheduler, epochs=config.epochs, device=device, evaluation=evaluation,
                    loss_name="NT-Xent loss", show_progress=show_progress, desc="simclr")
    model.eval()
    return SimCLRResult(as_encoder(model.backbone).eval(), model.head, trained.rows)
