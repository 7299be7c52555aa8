"""PoisonCAM: find the poisoned images of an unlabeled set by cluster activation masking (METHODS.md §2).

The first public implementation (the paper's code is not public, its body was not retrievable). What follows
PatchSearch's published code (Tejankar et al., CVPR 2023) and what is ours (measured in docs/poisoncam.md):

1. **Features and clusters** [PatchSearch]: L2-normalised encoder features, k-means (scikit-learn) with ``k``
   clusters. ``k="auto"``: ``N / 64`` clamped to [10, 1000] [ours: PatchSearch uses 1000 for ImageNet-100's 126k
   images; at N / 100 the digits' poisoned images shared clusters with clean ones and were located worse].
2. **Cluster activation masking** [the paper's idea, our definition]: fill a ``window`` square (the image's
   per-channel mean by default) and measure the drop of the image's activation: the cosine of its features to
   its own target (:meth:`PoisonCAM.own_targets`). ``heatmaps`` slides the window at ``stride`` and averages the
   drops over the windows covering each pixel (:mod:`trojanguard.ops.cluster_mask`, the reference of the sweep).
   The **candidate trigger** is the window whose fill drops the activation most, searched at a stride of
   ``window / 8`` (1 px at small sizes) [ours: coarse-to-fine from a half-window stride located worse].
   The own target is, by default, the mean of the image's 20 nearest fit-set features (``activation=
   "neighbours"``) [ours: with the nearest k-means centroid (``"cluster"``, the paper's wording) the located share
   moved between 0.70 and 1.0 with k-means' draws; with neighbours it stayed at 0.98–1.0].
3. **Poison score and iterative cluster search** [PatchSearch]: the candidate is pasted at a seeded random place on
   one test image per cluster (the member nearest the centroid); the score is how many test images of other
   clusters it pulls into its own cluster (ties broken by the mean cosine to that centroid [ours]). Each round
   scores ``candidates_per_round`` unsearched images of every surviving cluster, a cluster's score is its best
   image's, and the lowest ``drop_fraction`` of clusters are dropped, until every survivor is searched.
4. **Poison classifier** [PatchSearch]: negatives are the images outside the top ``exclude_fraction`` by poison
   score (an image the search did not reach counts with its cluster's best score [ours]: at 32 px the search
   reached fewer images and 54 poisoned ones stayed among the negatives); half of each batch gets one of the ``top_triggers`` best candidates pasted at a random scale and place
   (positives). An ensemble of ``ensemble`` small CNNs trained from scratch [ours; PatchSearch: [1,1,1,1]
   ResNet-18s, 2000 iterations], **cross-fitted** [ours]: member ``m`` never sees fold ``m`` of the negatives,
   which it scores, so a poisoned image left among the negatives is not memorised as benign. Up to ``rounds``
   rounds [ours]: a round's negatives drop every image the previous round scored above 0.1. The mean probability is
   ``poison_scores``; :meth:`score` is one forward pass (exported by :meth:`as_module`); ``flagged`` = probability
   > 0.5: no labels, no clean data.

``heatmap="gradcam"`` replaces step 2 by PatchSearch's Grad-CAM of the own-target similarity on the encoder's
last feature map, box-filtered with the window (its candidate is the argmax box): the baseline.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.detect.base import Detector
from trojanguard.errors import DataError, check_choice, check_positive_int
from trojanguard.ops.cluster_mask import box_masks, fill_values, own_similarity, sweep_windows
from trojanguard.ops.cluster_sweep import SweepEncoder, sweep_drops, sweep_heatmaps
from trojanguard.progress import progress_bar

HEATMAPS = ("mask", "gradcam")
ACTIVATIONS = ("neighbours", "cluster")  # what the masking sweep measures the drop of (own_targets)
AUTO = "auto"
IMAGES_PER_CLUSTER = 64  # k = N / 64 ...
CLUSTER_RANGE = (10, 1000)  # ... clamped to this
MIN_IMAGES_PER_CLUSTER = 2  # fewer images than 2 k: clusters of one image say nothing
WINDOW_FRACTION = 0.4  # the default window's side, of the image's shorter side
LOCATE_STRIDE_DIVISOR = 8  # the candidate search's stride: window / 8 (1 pixel for windows under 16)
FIT_OPTION_DEFAULTS = {"coarse_to_fine": False}  # what a fit saved before an option existed was fitted with
MIN_FEATURE_DIM = 16  # an output narrower than this is a classifier's logits, not features to cluster
PASTE_SCALE = (1 / 3, 4 / 3)  # a pasted candidate's side, relative to its own (PatchSearch: 20–79 px for 60 px)
FLAG_PROBABILITY = 0.5
FILE_FORMAT = "trojanguard.poisoncam/1"
# A later round's negatives are the kept images whose probability stayed at most this: dropping a clean image from
# the negatives costs little (they are plentiful), keeping a poisoned one teaches the classifier its trigger is benign.
NEGATIVE_CEILING = 0.1


@dataclass
class Trigger:
    """An extracted candidate trigger: ``crop (C, h, w)`` from image ``index`` at ``box = (top, left, h, w)``,
    with its poison ``score`` (flips into its cluster, step 3)."""

    index: int
    box: tuple[int, int, int, int]
    score: float
    crop: torch.Tensor = field(repr=False)


@dataclass
class PoisonCAMResult:
    """What :meth:`PoisonCAM.fit` found on the suspicious set (``N`` images).

    ``poison_scores (N,)``: the poison classifier's probability (higher = more suspicious); ``flagged (N,)`` bool:
    the images to remove; ``clusters (N,)``: k-means cluster of each image; ``search_scores (N,)``: step 3's score
    of the images the search reached (NaN elsewhere); ``boxes (N, 4)``: the candidate window of searched images
    (-1 elsewhere); ``triggers``: the best candidates, best first; ``seconds``: the fit's time per stage;
    ``rounds``: how many times the poison classifier was trained (fewer than ``rounds`` once its negatives settle).
    """

    poison_scores: torch.Tensor
    flagged: torch.Tensor
    clusters: torch.Tensor
    search_scores: torch.Tensor
    boxes: torch.Tensor
    triggers: list[Trigger]
    seconds: dict[str, float]
    rounds: int = 1


def auto_clusters(n: int) -> int:
    """The ``k`` rule: ``n / IMAGES_PER_CLUSTER`` clamped to :data:`CLUSTER_RANGE`."""
    low, high = CLUSTER_RANGE
    return max(low, min(high, round(n / IMAGES_PER_CLUSTER)))


def gather_images(data, name: str = "data") -> torch.Tensor:
    """All images of ``data`` (tensor, ImageDataset, Dataset, DataLoader, image folder or ``.npz`` path) as one
    ``(N, C, H, W)`` float tensor in [0, 1]."""
    from trojanguard.data import load_image_path
    from trojanguard.data.batching import iter_image_batches
    from trojanguard.data.core import check_images

    if isinstance(data, (str, Path)):
        data = load_image_path(data, name)
    if isinstance(data, torch.Tensor):
        return check_images(data, name)
    chunks = [x for x, _ in iter_image_batches(data, 1024)]
    if not chunks:
        raise DataError(f"{name}: expected images, got an empty source")
    return torch.cat(chunks)


def paste(x: torch.Tensor, crop: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor) -> torch.Tensor:
    """``x`` with ``crop (C, h, w)`` pasted with its top-left corner at ``(tops[i], lefts[i])`` on image ``i``."""
    out = x.clone()
    h, w = crop.shape[1:]
    for i, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist())):
        out[i, :, top : top + h, left : left + w] = crop
    return out


def random_places(n: int, height: int, width: int, h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Top-left corners for an ``h × w`` paste on ``n`` images, uniform over the places that fit."""
    tops = torch.randint(0, height - h + 1, (n,), generator=gen)
    lefts = torch.randint(0, width - w + 1, (n,), generator=gen)
    return tops, lefts


class PoisonScorer(nn.Module):
    """The exported filter: ``x -> (encoder features or model logits, poison probability)``, one forward pass."""

    def __init__(self, classifiers: nn.ModuleList, model: nn.Module):
        super().__init__()
        self.classifiers, self.model = classifiers, model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probability = torch.stack([net(x).softmax(1)[:, 1] for net in self.classifiers]).mean(0)
        return self.model(x), probability


class PoisonCAM(Detector):
    """Cluster activation masking on an SSL encoder's features: which images of an unlabeled set are poisoned.

    Args:
        encoder: a module mapping ``(N, C, H, W)`` in [0, 1] to ``(N, D)`` features, or an
            :class:`~trojanguard.models.Encoder` naming a layer; never modified.
        clusters: ``k`` of k-means, or ``"auto"`` (:func:`auto_clusters`).
        window / stride: the masking sweep's square side and step in pixels; ``None``: ``0.4`` of the image's
            shorter side and half the window. fill: what a window is filled with (a constant in [0, 1] or
            ``"mean"``, the image's per-channel mean).
        heatmap: ``"mask"`` (cluster activation masking) or ``"gradcam"`` (PatchSearch's baseline).
        activation / neighbours: what a window's fill drops: the cosine to the mean of the ``neighbours`` nearest
            fit-set features (``"neighbours"``) or to the nearest centroid (``"cluster"``).
        refine: after the candidate search (stride ``window / 8``), search the best window's neighbourhood at
            stride 1.
        coarse_to_fine: the candidate search first at stride ``window / 2``, then at stride ``window / 8`` only
            around each image's best coarse window (2.4–2.7× fewer encoder passes at 16–32 px; docs/poisoncam.md
            says what it keeps). Off: the search is exhaustive.
        candidates_per_round / drop_fraction: the iterative cluster search (module docstring, step 3).
        top_triggers / exclude_fraction: the poison classifier's triggers and the share of the set it never trains
            on (the most suspicious). ensemble / iterations / classifier_batch / lr: its training.
        batch_size: images per encoder forward. seed: every random draw. show_progress: progress lines.

    After :meth:`fit`: ``result`` (:class:`PoisonCAMResult`), ``centroids (K, D)``, ``input_shape``.
    """

    DECISION_THRESHOLD = FLAG_PROBABILITY  # ``screen`` flags by it when given no threshold and no clean data

    def __init__(self, encoder: nn.Module, *, clusters: int | str = AUTO, window: int | None = None,
                 stride: int | None = None, fill: float | str = "mean", heatmap: str = "mask",
                 activation: str = "neighbours", neighbours: int = 20, refine: bool = True,
                 coarse_to_fine: bool = False,
                 candidates_per_round: int = 2, drop_fraction: float = 0.25, top_triggers: int = 20,
                 exclude_fraction: float = 0.1, ensemble: int = 3, iterations: int = 1000, classifier_batch: int = 64,
                 lr: float = 0.01, rounds: int = 3, batch_size: int = 1024, seed: int = 0, show_progress: bool = True):
        from trojanguard.models.adapters import as_encoder

        check_choice("heatmap", heatmap, HEATMAPS)
        check_choice("activation", activation, ACTIVATIONS)
        if clusters != AUTO:
            check_positive_int("clusters", clusters)
        for name, value in (("window", window), ("stride", stride)):
            if value is not None:
                check_positive_int(name, value)
        fill_values(torch.zeros(1, 1, 1, 1), fill)  # a bad fill fails here, with what it accepts
        for name, value in (("candidates_per_round", candidates_per_round), ("top_triggers", top_triggers), ("neighbours", neighbours),
                            ("ensemble", ensemble), ("rounds", rounds), ("iterations", iterations), ("classifier_batch", classifier_batch),
                            ("batch_size", batch_size)):
            check_positive_int(name, value)
        for name, value in (("drop_fraction", drop_fraction), ("exclude_fraction", exclude_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"{name}: expected a fraction in [0, 1), got {value}")
        if not lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {lr}")
        self.encoder = as_encoder(encoder).eval()
        self.clusters, self.window, self.stride, self.fill = clusters, window, stride, fill
        self.heatmap, self.refine, self.coarse_to_fine = heatmap, refine, bool(coarse_to_fine)
        self.activation, self.neighbours = activation, neighbours
        self.reference_features: torch.Tensor | None = None
        self.candidates_per_round, self.drop_fraction = candidates_per_round, drop_fraction
        self.top_triggers, self.exclude_fraction = top_triggers, exclude_fraction
        self.ensemble, self.iterations, self.classifier_batch, self.lr = ensemble, iterations, classifier_batch, lr
        self.rounds = rounds
        self._sweeper: SweepEncoder | None = None  # the encoder prepared for the sweeps, made on first use
        self.batch_size, self.seed, self.show_progress = batch_size, seed, show_progress
        self.threshold: float | None = FLAG_PROBABILITY
        self.centroids: torch.Tensor | None = None
        self.classifiers: nn.ModuleList | None = None
        self.result: PoisonCAMResult | None = None
        self.input_shape: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return (f"PoisonCAM(clusters={self.clusters!r}, window={self.window!r}, stride={self.stride!r}, "
                f"fill={self.fill!r}, heatmap={self.heatmap!r}, activation={self.activation!r}, "
                f"neighbours={self.neighbours!r}, refine={self.refine!r}, coarse_to_fine={self.coarse_to_fine!r}, "
                f"ensemble={self.ensemble!r}, "
                f"iterations={self.iterations!r}, seed={self.seed!r})")

    @property
    def fitted(self) -> bool:
        return self.classifiers is not None

    # ------------------------------------------------------------------ geometry of the sweep
    def window_for(self, height: int, width: int) -> tuple[int, int]:
        """The sweep's ``(window, stride)`` in pixels for images of this size."""
        window = self.window or max(1, round(WINDOW_FRACTION * min(height, width)))
        if window > min(height, width):
            raise DataError(f"window: expected at most the images' shorter side, {min(height, width)} pixels, "
                            f"got {window}")
        return window, self.stride or max(1, window // 2)

    # ------------------------------------------------------------------ features and clusters
    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised encoder features ``(N, D)``."""
        out = [F.normalize(self.encoder(self._on_encoder(x[s : s + self.batch_size])).float(), dim=1).cpu()
               for s in range(0, len(x), self.batch_size)]
        return torch.cat(out)

    def _on_encoder(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the encoder's device: the encoder runs where the caller put it (a GPU), the rest of the fit
        (clustering, search bookkeeping, the poison classifier) on the CPU."""
        from trojanguard.models.features import model_device

        return t.to(model_device(self.encoder))

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (cosine) of each feature row."""
        return (features @ self.centroids.T).argmax(1)

    def own_targets(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` unit vectors whose cosine is the activation the masking sweep drops: the nearest centroid
        (``activation="cluster"``), or the mean of the ``neighbours`` fit-set features nearest to each row
        (``"neighbours"``, the default: a cluster of the image's own that k-means' draws do not move)."""
        if self.activation == "cluster":
            return self.centroids[self.assign(features)]
        out = []
        for s in range(0, len(features), self.batch_size):
            nearest = (features[s : s + self.batch_size] @ self.reference_features.T).topk(
                min(self.neighbours, len(self.reference_features)), dim=1).indices
            out.append(F.normalize(self.reference_features[nearest].mean(1), dim=1))
        return torch.cat(out)

    def check_encoder(self, x: torch.Tensor) -> None:
        """A DataError unless the encoder maps ``x`` to finite features of at least MIN_FEATURE_DIM dimensions."""
        dim = self.encoder.check(x[:4], argument="encoder", needed_by="PoisonCAM")
        if dim < MIN_FEATURE_DIM:
            raise DataError(f"encoder: expected features of at least {MIN_FEATURE_DIM} dimensions to cluster, got "
                            f"{dim}-dimensional output, which looks like a classifier's logits; pass an encoder or "
                            "an Encoder naming a feature layer")

    def _check_inputs(self, x, name: str = "x") -> torch.Tensor:
        from trojanguard.data.core import check_images

        x = check_images(x, name) if isinstance(x, torch.Tensor) else gather_images(x, name)
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"{name}: expected images of shape {self.input_shape} (what PoisonCAM was fitted on), got "
                            f"{tuple(x.shape[1:])}")
        return x.float()

    def _require_fit(self, where: str) -> None:
        if self.centroids is None:
            raise RuntimeError(f"PoisonCAM.{where}: call fit(data) first")

    # ------------------------------------------------------------------ heat maps and candidate windows
    def heatmaps(self, x, *, window: int | None = None, stride: int | None = None,
                 fill: float | str | None = None) -> torch.Tensor:
        """``(N, H, W)`` heat maps of the exhaustive cluster-masking sweep (or Grad-CAM with
        ``heatmap="gradcam"``), each image against its own target (:meth:`own_targets`)."""
        self._require_fit("heatmaps")
        x = self._check_inputs(x)
        default_window, default_stride = self.window_for(*x.shape[2:])
        window = window or default_window
        stride = stride or (default_stride if window == default_window else max(1, window // 2))
        own = self.own_targets(self.features(x))
        if self.heatmap == "gradcam":
            return self._gradcam(x, own)
        return sweep_heatmaps(self._sweep_encoder(), self._on_encoder(x), self._on_encoder(own),
                              sweep_windows(*x.shape[2:], window, stride), fill=self.fill if fill is None else fill,
                              batch_size=self.batch_size * 4).cpu()

    def locate(self, x) -> torch.Tensor:
        """``(N, 4)`` boxes ``(top, left, height, width)``: each image's candidate trigger window."""
        self._require_fit("locate")
        x = self._check_inputs(x)
        return self._locate(x, self.own_targets(self.features(x)))

    def _window_drops(self, x: torch.Tensor, own: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """``(N, W)`` own-target similarity drops of filling each window (one window list for all images)."""
        return sweep_drops(self._sweep_encoder(), self._on_encoder(x), self._on_encoder(own), windows, fill=self.fill,
                           batch_size=self.batch_size * 4).cpu()

    def _sweep_encoder(self) -> SweepEncoder:
        """The encoder prepared for the sweeps' many forward passes (:class:`SweepEncoder`: conv–BN folded,
        channels-last, cache-sized CPU passes); float32 always, so a screening's flags do not depend on whether the
        CPU has bfloat16. Rebuilt when the encoder has moved to another device."""
        from trojanguard.models.features import model_device

        device = model_device(self.encoder)
        if self._sweeper is None or self._sweeper.device != device:
            self._sweeper = SweepEncoder(self.encoder, device, low_precision=False)
        return self._sweeper

    def _locate(self, x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        window, stride = self.window_for(height, width)
        if self.heatmap == "gradcam":
            heat = self._gradcam(x, own)
            boxed = F.avg_pool2d(heat[:, None], window, stride=1)[:, 0]
            best = boxed.flatten(1).argmax(1)
            tops, lefts = best // boxed.shape[2], best % boxed.shape[2]
            return torch.stack([tops, lefts, torch.full_like(tops, window), torch.full_like(tops, window)], 1)
        stride = max(1, window // LOCATE_STRIDE_DIVISOR)
        if self.coarse_to_fine:
            boxes = self._coarse_then_fine(x, own, window, stride)
        else:
            windows = sweep_windows(height, width, window, stride)
            boxes = windows[self._window_drops(x, own, windows).argmax(1)]
        if not self.refine or stride == 1:
            return boxes
        return self._best_near(x, own, boxes, window, reach=stride - 1, step=1)  # stride 1 within one step

    def _coarse_then_fine(self, x: torch.Tensor, own: torch.Tensor, window: int, stride: int) -> torch.Tensor:
        """``(N, 4)`` best boxes of a search at stride ``window / 2``, refined at ``stride`` within one coarse step of
        each image's best coarse window."""
        coarse_stride = max(stride, window // 2)
        coarse = sweep_windows(*x.shape[2:], window, coarse_stride)
        boxes = coarse[self._window_drops(x, own, coarse).argmax(1)]
        if coarse_stride == stride:
            return boxes
        return self._best_near(x, own, boxes, window, reach=coarse_stride - 1, step=stride)

    def _best_near(self, x: torch.Tensor, own: torch.Tensor, boxes: torch.Tensor, window: int, *, reach: int,
                   step: int) -> torch.Tensor:
        """Per image, the best window among those offset from its box by up to ``reach`` pixels in steps of
        ``step`` (kept inside the image; offsets shared by every image)."""
        height, width = x.shape[2:]
        steps = torch.arange(-(reach // step), reach // step + 1) * step  # on the fine grid, through the box itself
        offsets = torch.cartesian_prod(steps, steps)
        best = torch.empty_like(boxes)
        for i in range(len(x)):
            tops = (boxes[i, 0] + offsets[:, 0]).clamp(0, height - window)
            lefts = (boxes[i, 1] + offsets[:, 1]).clamp(0, width - window)
            near = torch.unique(torch.stack([tops, lefts, torch.full_like(tops, window),
                                             torch.full_like(tops, window)], 1), dim=0)
            best[i] = near[self._window_drops(x[i : i + 1], own[i : i + 1], near)[0].argmax()]
        return best

    def _gradcam(self, x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """PatchSearch's baseline: Grad-CAM of ``cos(f(x), own centroid)`` on the encoder's last 4-D feature map,
        upsampled to the image, ``(N, H, W)``."""
        from trojanguard.models.adapters import unwrap
        from trojanguard.models.features import default_feature_layer, module_by_name

        user_module = unwrap(self.encoder.module)
        try:  # an Encoder naming a layer stops there: that layer's map, else the last map before pooling
            name = self.encoder.layer or default_feature_layer(user_module, self._on_encoder(x[:1]))
        except ValueError:
            name = ""
        if not name:
            raise DataError("heatmap: 'gradcam' needs an encoder with a 4-D feature map (a CNN) that can be hooked; "
                            "this one has none")
        module = module_by_name(user_module, name)
        maps = []
        for s in range(0, len(x), self.batch_size):
            xs, cs = self._on_encoder(x[s : s + self.batch_size]), self._on_encoder(own[s : s + self.batch_size])
            store: dict[str, torch.Tensor] = {}
            handle = module.register_forward_hook(lambda _m, _i, out, store=store: store.__setitem__("a", out))
            try:
                with torch.enable_grad():
                    similarity = own_similarity(self.encoder(xs), cs)
                    grads = torch.autograd.grad(similarity.sum(), store["a"])[0]
            finally:
                handle.remove()
            if store["a"].dim() != 4:
                raise DataError(f"heatmap: 'gradcam' needs a 4-D feature map; layer {name!r} outputs "
                                f"{tuple(store['a'].shape)}")
            cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True)).detach()
            maps.append(F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].cpu())
        return torch.cat(maps)

    # ------------------------------------------------------------------ fit
    def fit(self, data) -> PoisonCAM:
        """Find the poisoned images of ``data`` (the suspicious unlabeled set) and train the poison classifier;
        returns self (the findings are in :attr:`result`)."""
        self.input_shape = None  # a refit may change the image size
        x = self._check_inputs(data, "data")
        n = len(x)
        k = auto_clusters(n) if self.clusters == AUTO else int(self.clusters)
        if n < MIN_IMAGES_PER_CLUSTER * k:
            raise DataError(f"data: expected at least {MIN_IMAGES_PER_CLUSTER * k} images for {k} clusters, got {n}")
        self.window_for(*x.shape[2:])
        self.check_encoder(x)
        gen = torch.Generator().manual_seed(self.seed)
        seconds: dict[str, float] = {}

        start = time.perf_counter()
        features = self.features(x)
        self.centroids, clusters = kmeans(features, k, self.seed)
        self.reference_features = features
        seconds["features_kmeans"] = time.perf_counter() - start

        start = time.perf_counter()
        search_scores, boxes = self._search(x, features, clusters, gen)
        seconds["search"] = time.perf_counter() - start
        searched = torch.nonzero(~search_scores.isnan()).squeeze(1)
        order = searched[search_scores[searched].argsort(descending=True)]
        triggers = [Trigger(int(i), tuple(int(v) for v in boxes[i]), float(search_scores[i]),
                            crop_box(x[i], boxes[i])) for i in order[: self.top_triggers]]

        start = time.perf_counter()
        ranked = exclusion_scores(search_scores, clusters).argsort(descending=True)
        keep = ranked[round(self.exclude_fraction * n):]
        self.input_shape = tuple(x.shape[1:])
        for rounds in range(1, self.rounds + 1):
            folds = torch.randperm(len(keep), generator=gen) % self.ensemble if self.ensemble > 1 else None
            self.classifiers = self._train_classifiers(x, keep, folds, triggers, gen)
            poison_scores = self._member_probabilities(x)  # (members, N)
            if folds is None:
                poison_scores = poison_scores.mean(0)
            else:  # cross-fitting: a kept image is scored by the one member that never trained on it
                out_of_fold = poison_scores[folds, keep]
                poison_scores = poison_scores.mean(0)
                poison_scores[keep] = out_of_fold
            unsuspicious = keep[poison_scores[keep] <= NEGATIVE_CEILING]  # the next round's negatives
            if len(unsuspicious) == len(keep):
                break  # nothing left to drop from the negatives: another round would train on the same pool
            keep = unsuspicious
        seconds["classifier"] = time.perf_counter() - start
        self.result = PoisonCAMResult(poison_scores, poison_scores > FLAG_PROBABILITY, clusters, search_scores, boxes,
                                      triggers, seconds, rounds)
        return self

    def _search(self, x: torch.Tensor, features: torch.Tensor, clusters: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: the iterative cluster search. Returns ``search_scores (N,)`` (NaN where not searched) and the
        candidate boxes ``(N, 4)`` (-1 where not searched)."""
        n, k = len(x), len(self.centroids)
        similarity = features @ self.centroids.T
        members = [torch.nonzero(clusters == j).squeeze(1) for j in range(k)]
        alive = [j for j in range(k) if len(members[j])]
        # the test set: per cluster, its member nearest the centroid
        tests = torch.stack([members[j][similarity[members[j], j].argmax()] for j in alive])
        test_clusters = clusters[tests]
        queues = {j: members[j][torch.randperm(len(members[j]), generator=gen)].tolist() for j in alive}
        scores = torch.full((n,), math.nan)
        boxes = torch.full((n, 4), -1, dtype=torch.long)
        best = {j: -math.inf for j in alive}
        window, _ = self.window_for(*x.shape[2:])
        places = random_places(len(tests), *x.shape[2:], window, window, gen)
        bar = progress_bar(n, desc="PoisonCAM search", unit="img", enable=self.show_progress)
        while any(queues[j] for j in alive):
            batch = [i for j in alive for i in queues[j][: self.candidates_per_round]]
            for j in alive:
                del queues[j][: self.candidates_per_round]
            index = torch.tensor(batch)
            found = self._locate(x[index], self.own_targets(features[index]))
            boxes[index] = found
            for i, box in zip(batch, found):
                scores[i] = self._flip_score(x, crop_box(x[i], box), int(clusters[i]), tests, test_clusters, places)
                best[int(clusters[i])] = max(best[int(clusters[i])], float(scores[i]))
            bar.update(len(batch))
            drop = math.floor(self.drop_fraction * len(alive))
            if drop:
                alive = sorted(alive, key=lambda j: best[j], reverse=True)[: len(alive) - drop]
        bar.close()
        return scores, boxes

    @torch.no_grad()
    def _flip_score(self, x, crop, cluster, tests, test_clusters, places) -> float:
        """How many test images of other clusters ``crop`` pulls into ``cluster``, plus the mean cosine of all
        test images to its centroid, mapped into [0, 1) (the tiebreak)."""
        h, w = crop.shape[1:]
        height, width = x.shape[2:]
        tops, lefts = (places[0].clamp(max=height - h), places[1].clamp(max=width - w))
        pasted = paste(x[tests], crop, tops, lefts)
        feats = self.features(pasted)
        landed = self.assign(feats)
        others = test_clusters != cluster
        flips = int((landed[others] == cluster).sum())
        pull = float((feats @ self.centroids[cluster]).mean())
        return flips + 0.999 * (1 + pull) / 2

    # ------------------------------------------------------------------ the poison classifier
    def _train_classifiers(self, x: torch.Tensor, keep: torch.Tensor, folds: torch.Tensor | None,
                           triggers: list[Trigger], gen: torch.Generator) -> nn.ModuleList:
        """The ensemble: member ``m`` trains on the kept images outside fold ``m`` (all kept images without folds),
        so that every kept image has a member that never saw it as a negative."""
        from trojanguard.cleanse._training import train
        from trojanguard.models.nets import build_model

        if not triggers:
            raise DataError("data: the cluster search found no candidate trigger (no image was searched)")
        channels = x.shape[1]
        crops = [t.crop for t in triggers]
        steps_per_epoch = min(100, self.iterations)
        epochs = max(1, round(self.iterations / steps_per_epoch))
        nets = nn.ModuleList()
        for member in range(self.ensemble):
            torch.manual_seed(self.seed * 1000 + member)
            # trained channels-last (NHWC): the CPU's convolution and pooling kernels run this small CNN's steps ~1.5×
            # as fast as in NCHW (benchmarks/RESULTS.md, "PoisonCAM's classifier channels-last"); the same function,
            # its sums in another order; returned in NCHW, as saved and exported
            net = build_model("small_cnn", num_classes=2, in_channels=channels).to(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
            pool = x[keep if folds is None else keep[folds != member]]
            batches = PastedBatches(pool, crops, self.classifier_batch, steps_per_epoch,
                                    torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=gen))))

            def step(batch, _epoch, _index, net=net):
                images, labels = batch
                return F.cross_entropy(net(images.contiguous(memory_format=torch.channels_last)), labels)

            net.train()
            train(net, step, batches, optimizer=optimizer, scheduler=scheduler, epochs=epochs,
                  device=torch.device("cpu"), show_progress=self.show_progress,
                  desc=f"PoisonCAM classifier {member + 1}/{self.ensemble}")
            nets.append(net.to(memory_format=torch.contiguous_format).eval())
        return nets

    # ------------------------------------------------------------------ saving a fit
    def fit_options(self) -> dict:
        """The options that shape a fit (what :meth:`save` records and :meth:`load` checks)."""
        return {"clusters": self.clusters, "window": self.window, "stride": self.stride, "fill": self.fill,
                "heatmap": self.heatmap, "activation": self.activation, "neighbours": self.neighbours,
                "refine": self.refine, "coarse_to_fine": self.coarse_to_fine,
                "candidates_per_round": self.candidates_per_round,
                "drop_fraction": self.drop_fraction, "top_triggers": self.top_triggers,
                "exclude_fraction": self.exclude_fraction, "ensemble": self.ensemble, "rounds": self.rounds,
                "iterations": self.iterations, "classifier_batch": self.classifier_batch, "lr": self.lr,
                "seed": self.seed}

    def save(self, path) -> Path:
        """Write the fit (centroids, fit-set features, the classifiers, the result) to ``path`` (``.safetensors``:
        tensors and JSON metadata, no pickle) and return it."""
        from safetensors.torch import save_file

        from trojanguard.models.io import model_sha256

        self._require_fit("save")
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"path: expected a file name ending in .safetensors, got {str(path)!r}")
        result = self.result
        tensors = {"centroids": self.centroids, "reference_features": self.reference_features,
                   "poison_scores": result.poison_scores, "flagged": result.flagged, "clusters": result.clusters,
                   "search_scores": result.search_scores, "boxes": result.boxes}
        tensors.update({f"trigger.{i}": t.crop for i, t in enumerate(result.triggers)})
        for m, net in enumerate(self.classifiers):
            tensors.update({f"classifier.{m}.{k}": v for k, v in net.state_dict().items()})
        metadata = {"format": FILE_FORMAT, "encoder_sha256": model_sha256(self.encoder),
                    "options": self.fit_options(), "input_shape": list(self.input_shape),
                    "triggers": [[t.index, list(t.box), t.score] for t in result.triggers],
                    "seconds": result.seconds, "rounds": result.rounds}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial),
                  metadata={"trojanguard": json.dumps(metadata)})
        partial.replace(path)  # a killed save leaves no half-written fit under the real name
        return path

    @classmethod
    def load(cls, path, encoder: nn.Module, **options) -> PoisonCAM:
        """A fitted PoisonCAM from a file written by :meth:`save`, for ``encoder`` (the same weights: checked by
        SHA-256), with the saved fit's options; ``options`` may set ``batch_size`` and ``show_progress``, and any
        other that differs from the saved fit's is an error. Never unpickles; a file of another kind is a
        ModelLoadError naming it."""
        meta, _ = read_fit(path)
        return cls(encoder, **{**meta["options"], **options}).restore(path)

    def restore(self, path) -> PoisonCAM:
        """Take the fit saved at ``path`` (:meth:`save`) into this detector, whose options must be the fit's."""
        from trojanguard.models.io import ModelLoadError, model_sha256
        from trojanguard.models.nets import build_model

        meta, tensors = read_fit(path)
        saved = {**FIT_OPTION_DEFAULTS, **meta["options"]}  # options added since older fits were saved
        differing = {k: v for k, v in self.fit_options().items() if saved.get(k) != v}
        if differing:
            raise ValueError(f"options: expected the saved fit's options, got {differing} (saved: "
                             f"{ {k: saved.get(k) for k in differing} })")
        if meta.get("encoder_sha256") != model_sha256(self.encoder):
            raise ModelLoadError(f"path: {path}: expected a fit of this encoder (weights sha256 "
                                 f"{model_sha256(self.encoder)[:12]}…), got one of another encoder")
        self.centroids, self.reference_features = tensors["centroids"], tensors["reference_features"]
        self.input_shape = tuple(meta["input_shape"])
        nets = nn.ModuleList()
        for m in range(self.ensemble):
            net = build_model("small_cnn", num_classes=2, in_channels=self.input_shape[0])
            prefix = f"classifier.{m}."
            net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            nets.append(net.eval())
        self.classifiers = nets
        triggers = [Trigger(int(i), tuple(box), float(score), tensors[f"trigger.{k}"])
                    for k, (i, box, score) in enumerate(meta["triggers"])]
        self.result = PoisonCAMResult(tensors["poison_scores"], tensors["flagged"].bool(), tensors["clusters"],
                                      tensors["search_scores"], tensors["boxes"], triggers, meta["seconds"],
                                      meta["rounds"])
        return self

    # ------------------------------------------------------------------ scoring and export
    @torch.no_grad()
    def _member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``(members, N)`` poison probability of each classifier."""
        return torch.cat([torch.stack([net(x[s : s + self.batch_size]).softmax(1)[:, 1] for net in self.classifiers])
                          for s in range(0, len(x), self.batch_size)], dim=1)

    def score(self, x) -> torch.Tensor:
        """``(N,)`` poison probability: the mean of the classifier ensemble (one forward pass per member)."""
        if self.classifiers is None:
            raise RuntimeError("PoisonCAM.score: call fit(data) first")
        return self._member_probabilities(self._check_inputs(x)).mean(0)

    def as_module(self, model: nn.Module | None = None) -> nn.Module:
        """``x -> (features, poison probability)`` (or ``(logits, probability)`` with a classifier ``model``)."""
        if self.classifiers is None:
            raise RuntimeError("PoisonCAM.as_module: call fit(data) first")
        return PoisonScorer(self.classifiers, self.encoder if model is None else model).eval()

    def explain(self, x: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        """The report's pictures of images ``x``: ``masks (K, 1, H, W)``, each heat map scaled to [0, 1] (shown where
        CD shows its masks), and ``patterns (K, C, H, W)``, the image with its candidate box outlined in red (or
        white for one channel)."""
        heat = self.heatmaps(x)
        low = heat.flatten(1).min(1).values[:, None, None]
        high = heat.flatten(1).max(1).values[:, None, None]
        masks = ((heat - low) / (high - low).clamp_min(1e-12))[:, None]
        return {"masks": masks, "patterns": outline_boxes(x, self.locate(x))}


def outline_boxes(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``x`` with a one-pixel outline of each image's ``box = (top, left, height, width)``: red on colour images,
    white on grey ones."""
    inside = box_masks(boxes, *x.shape[2:])
    interior = box_masks(boxes + torch.tensor([1, 1, -2, -2]), *x.shape[2:])
    edge = (inside & ~interior)[:, None]
    colour = torch.tensor([1.0, 0.0, 0.0] if x.shape[1] == 3 else [1.0] * x.shape[1])[None, :, None, None]
    return torch.where(edge, colour, x)


def read_fit(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of a PoisonCAM fit file (:meth:`PoisonCAM.save`), checked to be one."""
    from trojanguard.models.io import ModelLoadError, read_fit_file

    meta, tensors = read_fit_file(path, "path", "a PoisonCAM fit written by PoisonCAM.save")
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT or "centroids" not in tensors:
        raise ModelLoadError(f"path: {path}: expected a PoisonCAM fit ({FILE_FORMAT}), got a safetensors file "
                             "without its metadata or tensors")
    return meta, tensors


def exclusion_scores(search_scores: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """What the classifier's negatives are chosen by: a searched image's poison score, and for an image the search
    did not reach, the best score found in its cluster (a cluster the search dropped early may still hold poison
    its first candidates missed; its members should not be the classifier's clean examples) [ours]."""
    searched = ~search_scores.isnan()
    best = torch.full((int(clusters.max()) + 1,), -math.inf)
    best.scatter_reduce_(0, clusters[searched], search_scores[searched], reduce="amax")
    return torch.where(searched, search_scores, best[clusters])


def crop_box(image: torch.Tensor, box) -> torch.Tensor:
    """``image (C, H, W)`` cropped to ``box = (top, left, height, width)``."""
    top, left, h, w = (int(v) for v in box)
    return image[:, top : top + h, left : left + w].clone()


def kmeans(features: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn k-means on unit features: unit centroids ``(k, D)`` and each row's nearest (cosine) centroid."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        if len(features) > 50_000:
            fitted = MiniBatchKMeans(k, random_state=seed, batch_size=4096, n_init=3).fit(features.numpy())
        else:
            fitted = KMeans(k, random_state=seed, n_init=3).fit(features.numpy())
    centroids = F.normalize(torch.as_tensor(np.asarray(fitted.cluster_centers_), dtype=torch.float32), dim=1)
    return centroids, (features @ centroids.T).argmax(1)


class PastedBatches:
    """The poison classifier's data, ``steps`` batches per pass: random images of ``pool``, half of them with a
    random candidate of ``crops`` pasted at a random scale (:data:`PASTE_SCALE` of its side) and place; labels
    1 pasted, 0 not."""

    def __init__(self, pool: torch.Tensor, crops: list[torch.Tensor], batch: int, steps: int, gen: torch.Generator):
        self.pool, self.crops, self.batch, self.steps, self.gen = pool, crops, batch, steps, gen

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        height, width = self.pool.shape[2:]
        for _ in range(self.steps):
            index = torch.randint(len(self.pool), (self.batch,), generator=self.gen)
            images = self.pool[index].clone()
            labels = (torch.rand(self.batch, generator=self.gen) < 0.5).long()
            for i in torch.nonzero(labels).squeeze(1).tolist():
                crop = self.crops[int(torch.randint(len(self.crops), (1,), generator=self.gen))]
                low, high = PASTE_SCALE
                scale = low + (high - low) * float(torch.rand(1, generator=self.gen))
                h = max(1, min(height, round(crop.shape[1] * scale)))
                w = max(1, min(width, round(crop.shape[2] * scale)))
                resized = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                top = int(torch.randint(height - h + 1, (1,), generator=self.gen))
                left = int(torch.randint(width - w + 1, (1,), generator=self.gen))
                images[i, :, top : top + h, left : left + w] = resized
            yield images, labels
