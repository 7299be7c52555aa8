"""Unlabeled data for cleansing: in-distribution (the clean half of a zoo model's training set, labels
withheld) and out-of-distribution (crops of natural photos, adapted to the model).

Out-of-distribution data carries a model's clean behaviour only where the model responds to it. Raw colour
photo crops do not look like what a digits model was trained on: it sends most of them to one or two classes
(Blended's to its target: docs/cleansing.md), so distillation exercises a few decision regions — and, for a
texture-like trigger, the backdoor itself. :func:`ood_images` with ``model=`` therefore

1. renders a pool of crops in several generic *views* (colour or grey, inverted or not, gamma, low-pass;
   and edge maps of low-passed crops — line drawings), see :data:`VIEWS`;
2. keeps the view under which the model's predicted classes are most evenly spread (highest entropy of the
   predicted-class histogram: the "information entropy" criterion of data-free distillation, DAFL, Chen et
   al. 2019 — in-distribution data has the maximum, ln K);
3. takes a class-balanced subset of the pool by the model's predictions (round-robin over classes), so no
   class — a backdoor target included — dominates the distillation data.

Nothing here uses labels, the trigger or the target: only the suspicious model's own predictions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.cleanse.base import model_device, preflight
from trojanguard.cleanse.distillation import normalisation_gap
from trojanguard.data import OOD_SOURCES, load_ood_source
from trojanguard.errors import DataError

DEFAULT_OOD_IMAGES = 2000  # METHODS.md §3 CPU scale: 500–2000 images; crops are free (measured: BadNets CA
# 0.936 with 1 000 images, 0.975 with 2 000, same 20 epochs)
POOL_FACTOR = 4  # crops drawn per image kept: the class-balanced subset needs rare classes to occur in the pool
VIEW_SAMPLE = 256  # crops the model predicts per candidate view when choosing the view
EDGE_QUANTILE = 0.98  # edge maps are scaled so this quantile of an image's gradient magnitude becomes 1


@dataclass(frozen=True)
class View:
    """A generic rendering of natural-photo crops. ``kind``: 'photo' (``grey``, ``invert``, ``gamma``) or
    'edges' (gradient magnitude of the grey image: a line drawing); ``blur``: low-pass factor (1 = none)."""

    kind: str = "photo"
    grey: bool = False
    invert: bool = False
    gamma: float = 1.0
    blur: int = 1

    def __str__(self) -> str:
        if self.kind == "edges":
            return f"edges(blur {self.blur})"
        return (f"{'grey' if self.grey else 'colour'}{', inverted' if self.invert else ''}"
                f"{f', gamma {self.gamma:g}' if self.gamma != 1 else ''}{f', blur {self.blur}' if self.blur > 1 else ''}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, 3, H, W)`` colour crops in [0, 1] → the same shape in [0, 1]."""
        if self.blur > 1:
            h, w = x.shape[-2:]
            small = F.interpolate(x, size=(max(1, h // self.blur), max(1, w // self.blur)), mode="area")
            x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        if self.kind == "edges":
            return edge_map(x).expand_as(x).contiguous()
        if self.grey:
            x = x.mean(1, keepdim=True).expand_as(x)
        if self.invert:
            x = 1 - x
        return x.clamp(0, 1).pow(self.gamma).contiguous()


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image, ``(N, 1, H, W)`` in [0, 1] (per-image scaled)."""
    grey = x.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device).view(1, 1, 3, 3) / 8
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    magnitude = (F.conv2d(padded, kx).pow(2) + F.conv2d(padded, kx.transpose(2, 3)).pow(2)).sqrt()
    scale = magnitude.flatten(1).quantile(EDGE_QUANTILE, dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return (magnitude / scale).clamp(0, 1)


VIEWS: tuple[View, ...] = tuple(
    [View("photo", grey, invert, gamma, blur)
     for grey, invert, gamma, blur in itertools.product((False, True), (False, True), (1.0, 2.0, 4.0), (1, 2))]
    + [View("edges", blur=blur) for blur in (1, 2, 4, 8)])


@torch.no_grad()
def predicted_classes(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's argmax class for every image (eval mode, on the model's device). Returns ``(N,)`` on the CPU."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def class_entropy(classes: torch.Tensor) -> float:
    """Entropy (nats) of the histogram of predicted classes: ln K when K classes are equally frequent."""
    counts = torch.bincount(classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# How the view is chosen: "entropy" (default) — the most even spread of the model's predicted classes; "gap" — the
# least normalisation gap to the model's batch-norm statistics (ours, thirty-second session: on the digits zoo the
# entropy rule's rare grey photo views cost a class; measured, not the default: benchmarks/RESULTS.md)
VIEW_RULES = ("entropy", "gap")


def choose_view(model: nn.Module, crops: torch.Tensor, views: tuple[View, ...] = VIEWS,
                channels: int = 3, rule: str = "entropy") -> tuple[View, dict[str, float]]:
    """The view ``rule`` picks (:data:`VIEW_RULES`; default: the one under which ``model`` spreads ``crops`` most
    evenly over its classes), and every view's entropy."""
    _check_view_rule(rule)
    rendered = {view: _channels(view(crops), channels) for view in views}
    scores = {view: class_entropy(predicted_classes(model, x)) for view, x in rendered.items()}
    if rule == "gap":
        device = model_device(model)
        with torch.no_grad():
            gaps = {view: normalisation_gap(model, x.to(device)) for view, x in rendered.items()}
        if any(gap is None for gap in gaps.values()):
            raise ValueError("view_rule: 'gap' needs a model with batch-norm running statistics; this one has none")
        best = min(views, key=lambda v: gaps[v])  # first of equals: the plainest view
    else:
        best = max(views, key=lambda v: scores[v])  # first of equals: the plainest view
    return best, {str(v): round(s, 4) for v, s in scores.items()}


def _check_view_rule(rule: str) -> None:
    if rule not in VIEW_RULES:
        raise ValueError(f"view_rule: expected one of {', '.join(VIEW_RULES)}, got {rule!r}")


def balanced_subset(classes: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` items taken round-robin over the predicted classes (each class's items in a seeded random
    order), so that every class contributes equally while it has items left. Returns sorted indices ``(n,)``."""
    if n > len(classes):
        raise DataError(f"n: asked for {n} images from a pool of {len(classes)}")
    gen = torch.Generator().manual_seed(seed)
    buckets = [idx[torch.randperm(len(idx), generator=gen)] for k in classes.unique()
               for idx in [(classes == k).nonzero().flatten()]]
    depth = torch.cat([torch.arange(len(b)) for b in buckets])
    order = torch.cat(list(buckets))
    # take by round (depth in its class), then by class: ties keep the classes' order
    taken = order[torch.sort(depth, stable=True).indices[:n]]
    return taken.sort().values


def _channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x if channels == 3 else x.mean(1, keepdim=True)


def clean_half(entry, seed: int = 0, fraction: float = 0.5, untouched: bool = True) -> torch.Tensor:
    """In-distribution unlabeled images of a zoo model: a seeded random ``fraction`` (default half) of its
    training images that were *not* poisoned, labels dropped. ``entry``: a :class:`trojanguard.zoo.ZooEntry`.

    ``untouched`` (default) also leaves out the images the attack changed without relabelling them — the cover
    samples (``PoisonedDataset.cover_indices``) of WaNet and the adaptive and input-aware families, which carry a
    (partial) trigger with their true label and are not marked as poisoned. Distilled on, they carry the backdoor over: on the digits zoo the teacher sends a
    third of the adaptive families' covers to the target, and BCU kept ASR 1.000 with them and reached 0.000
    without them (issue 16; benchmarks/bcu_view_target.py). The draw is the same either way, so ``untouched=False``
    gives the earlier data and ``untouched=True`` its subset.

    Returns ``(M, C, H, W)`` in [0, 1]. (The defender is assumed to hold some clean in-distribution images,
    as in the paper's held-out split; they were part of the model's training set here.)
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a value in (0, 1], got {fraction}")
    clean = (~entry.train.is_poisoned).nonzero().flatten()
    order = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))]
    keep = order[: max(1, int(len(clean) * fraction))].sort().values
    if untouched:
        keep = keep[~entry.train.is_cover[keep]]
    return entry.train.dataset.x[keep]


def ood_images(n: int = DEFAULT_OOD_IMAGES, size: int = 32, channels: int = 3, seed: int = 0,
               model: nn.Module | None = None, pool_factor: int = POOL_FACTOR,
               info: dict | None = None, source: str = "photos", view_rule: str = "entropy") -> torch.Tensor:
    """Out-of-distribution unlabeled images ``(n, channels, size, size)`` in [0, 1] from ``source``: ``photos``
    (random crops of scikit-learn's sample photos), ``dead_leaves``, ``fractal`` or ``strokes`` (procedural, generated
    from ``seed``: :func:`trojanguard.data.load_procedural`) or ``photos+strokes`` (half each:
    :func:`trojanguard.data.load_ood_source`).

    Without ``model``: ``n`` raw images. With ``model`` (the suspicious classifier): ``pool_factor · n`` images
    rendered in the view the model spreads most evenly over its classes (``view_rule="gap"``: the view closest to its
    batch-norm statistics, :func:`choose_view`), then a class-balanced subset of ``n`` by its predictions (see the
    module docstring). ``info``, when given, receives the source, the chosen view, every
    view's entropy and the class shares of the result.
    """
    if n <= 0:
        raise DataError(f"n: expected a positive number of images, got {n}")
    if source not in OOD_SOURCES:
        raise DataError(f"source: expected one of {', '.join(OOD_SOURCES)}, got {source!r}")
    _check_view_rule(view_rule)  # also without a model: a typo fails here, not on the first call with one
    if model is None:
        return _source_images(source, n, size, channels, seed)
    if pool_factor < 1:
        raise ValueError(f"pool_factor: expected ≥ 1, got {pool_factor}")
    crops = _source_images(source, n * pool_factor, size, 3, seed)
    preflight(model, _channels(crops[:2], channels), model_device(model))  # clear error if the crops do not fit
    if info is not None:
        info.update(source=source)
    return adapt_to_model(model, crops, n, seed, channels, info, view_rule)


def adapt_to_model(model: nn.Module, images: torch.Tensor, n: int, seed: int = 0, channels: int = 3,
                   info: dict | None = None, view_rule: str = "entropy") -> torch.Tensor:
    """Colour images ``(N, 3, H, W)`` in [0, 1] (crops, procedural images, your own folder) adapted to ``model`` as
    :func:`ood_images` adapts its crops: rendered in the view ``view_rule`` picks (:func:`choose_view`; default: the
    most even spread of the model's classes), then a class-balanced subset of ``n`` by its predictions. ``info``, when given, receives the chosen view, every view's
    entropy and the class shares of the result."""
    view, scores = choose_view(model, images[:VIEW_SAMPLE], channels=channels, rule=view_rule)
    pool = _channels(view(images), channels)
    classes = predicted_classes(model, pool)
    chosen = balanced_subset(classes, n, seed)
    if info is not None:
        shares = torch.bincount(classes[chosen]).double() / n
        info.update(view=str(view), view_rule=view_rule, view_entropy=scores, pool=len(pool),
                    class_share=[round(float(s), 4) for s in shares], entropy=class_entropy(classes[chosen]),
                    max_entropy=math.log(max(2, int(classes.max()) + 1)))
    return pool[chosen].contiguous()


def _source_images(source: str, n: int, size: int, channels: int, seed: int) -> torch.Tensor:
    return load_ood_source(source, n=n, size=size, channels=channels, seed=seed).x
