"""Amortised Cognitive Distillation: a small head on the frozen model's features, trained to reproduce CD's
suspicion ranking, so that CD's judgement costs one forward pass instead of ~100 forward/backward passes.

Fit (the expensive detector teaches the cheap one): Cognitive Distillation scores a screened set of images
(at most ``max_teacher_images`` of the data, or scores you computed already); the head — a linear map (or a
small MLP) of the standardised, globally average-pooled output of one layer of the frozen model (default: the last 4-D map
before global pooling, as :class:`~trojanguard.detect.FeatureMahalanobis` picks it) and the model's predicted
class distribution — learns to order those images as CD does. The head is linear by default (``hidden=0``):
on held-out data it detects better than a small MLP, which follows CD more closely, CD's per-image noise
included; an extra image branch (a small CNN on the pixels) gained nothing, so there is none (measurements:
docs/guard.md, "The amortised CD detector", and ``benchmarks/RESULTS.md``, "Amortised CD"). Score = the head's output, higher = more suspicious;
``calibrate`` and ``predict`` as every detector.

Why ranking, not regression. Only CD's *order* matters for detection (AUROC, a quantile threshold), and CD's
scores are a noisy, bimodal quantity (1 − mean mask, redrawn noise every step): a least-squares fit spends its
capacity on their scale and on the noise among clean images. The default objective is a pairwise logistic
(RankNet) loss over every pair of teacher images, each pair weighted by its teacher-score gap, so the pairs
CD separates clearly (poisoned vs clean) dominate and the near-ties among clean images barely count. On the
zoo the ranking head's held-out AUROC is above the regression head's on every attack, and above CD's own,
since one linear direction in feature space cannot follow CD's per-image noise (``benchmarks/RESULTS.md``). ``objective="regress"`` (MSE on standardised scores) is kept for
comparison.

The scorer (:meth:`AmortizedCD.as_module`) is pure tensor operations returning ``(logits, score)`` from one
forward pass of the model, with the standardisation folded into the first layer, so it runs inside
:class:`trojanguard.guard.Guard` and exports to ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.data.batching import count_images, iter_image_batches
from trojanguard.detect._feature_detector import FeatureDetector
from trojanguard.detect.feature_mahalanobis import single_thread
from trojanguard.errors import DataError, check_choice, check_positive_int
from trojanguard.models.features import FeatureTap

OBJECTIVES = ("rank", "regress")
DEFAULT_TEACHER_IMAGES = 1024  # CD cost: minutes on a 2-core CPU for 1 000 images at 32×32 with a small CNN
DEFAULT_HIDDEN = 0  # linear head (module docstring)
DEFAULT_EPOCHS = 300  # full-batch Adam steps; the head has a few thousand parameters
DEFAULT_LR = 1e-2
DEFAULT_WEIGHT_DECAY = 1e-3
RANK_PAIR_CHUNK = 2048  # rows of the (n, n) pair matrix per chunk, so memory stays O(chunk·n)
MIN_TEACHER_IMAGES = 8
CONSTANT_SCORES_RTOL = 1e-6  # teacher scores spread below this (relative): float rounding, not a ranking


class AmortizedCD(FeatureDetector):
    """A one-pass student of Cognitive Distillation: a linear head (or small MLP) on a layer's pooled features
    and the predicted class distribution, trained to rank as CD ranks a screened dataset.

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] and returning ``(N, K)`` logits;
            never modified (the detector runs a private copy).
        layer: module whose output feeds the head (``(N, C', H', W')`` maps are averaged over space, ``(N, D)``
            used as is); default: the last 4-D output before global pooling.
        probabilities: also feed the head the model's softmax output ``(N, K)``.
        hidden: width of the head's hidden ReLU layer; 0 (default): a linear head.
        objective: ``"rank"`` (pairwise ranking of the teacher's scores, default) or ``"regress"`` (MSE on
            standardised teacher scores); module docstring for why.
        epochs, lr, weight_decay: full-batch Adam on the head.
        max_teacher_images: at most this many images of the fit data are scored by the teacher (a seeded random
            subset of larger data); None: all. Ignored when the teacher's scores are given.
        batch_size: images per forward pass when extracting features and scoring.
        seed: the teacher subset and the head's initialisation.
        show_progress: progress bars.

    After :meth:`fit`: ``teacher_scores`` ``(n,)`` and ``teacher_indices`` ``(n,)`` (positions in the fit data)
    of the images the head was trained on, ``input_shape`` ``(C, H, W)``.
    """

    FIT_CALL = "fit(data, teacher=...)"
    SCORE_DESCRIPTION = "amortised CD"

    def __init__(self, model: nn.Module, *, layer: str | None = None, probabilities: bool = True,
                 hidden: int = DEFAULT_HIDDEN, objective: str = "rank", epochs: int = DEFAULT_EPOCHS,
                 lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                 max_teacher_images: int | None = DEFAULT_TEACHER_IMAGES, batch_size: int = 256, seed: int = 0,
                 show_progress: bool = True):
        check_choice("objective", objective, OBJECTIVES)
        if hidden < 0:
            raise ValueError(f"hidden: expected a width ≥ 0 (0: linear head), got {hidden}")
        check_positive_int("epochs", epochs)
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"lr, weight_decay: expected lr > 0 and weight_decay ≥ 0, got {lr}, {weight_decay}")
        if max_teacher_images is not None and max_teacher_images < MIN_TEACHER_IMAGES:
            raise ValueError(f"max_teacher_images: expected None or at least {MIN_TEACHER_IMAGES}, "
                             f"got {max_teacher_images}")
        super().__init__(model, layer=layer, batch_size=batch_size, show_progress=show_progress)
        self.probabilities, self.hidden = probabilities, hidden
        self.objective, self.epochs, self.lr, self.weight_decay = objective, epochs, lr, weight_decay
        self.max_teacher_images, self.seed = max_teacher_images, seed
        self.head: AmortizedHead | None = None
        self.teacher_scores: torch.Tensor | None = None
        self.teacher_indices: torch.Tensor | None = None

    def __repr__(self) -> str:
        keys = ("layer", "probabilities", "hidden", "objective", "epochs", "lr", "weight_decay",
                "max_teacher_images", "seed")
        return f"AmortizedCD({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    @property
    def fitted(self) -> bool:
        return self.head is not None

    # ------------------------------------------------------------------------------------------ public API
    def fit(self, data, teacher=None) -> AmortizedCD:
        """Train the head to rank ``data`` as the teacher does and return ``self``.

        Args:
            data: images in [0, 1] (tensor, ImageDataset, Dataset, DataLoader) — the screened set, e.g. the
                training set under suspicion (it may be poisoned: that is what the teacher finds).
            teacher: None (a default :class:`~trojanguard.detect.CognitiveDistillation` of the model), any
                detector with ``score(x) -> (N,)`` (higher = more suspicious), or its scores of ``data``
                already computed, a ``(N,)`` tensor aligned with ``data``.
        """
        precomputed = teacher is not None and not callable(getattr(teacher, "score", None))
        if precomputed:
            scores = torch.as_tensor(teacher).detach().float().flatten().cpu()
            x, indices = _collect(data, None, self.batch_size)
            if len(scores) != len(x):
                raise DataError(f"teacher: expected {len(x)} scores (one per image of data), got {len(scores)}")
        else:
            total = count_images(data)
            chosen = None
            if self.max_teacher_images is not None and (total is None or total > self.max_teacher_images):
                if total is None:
                    total = sum(len(xb) for xb, _ in iter_image_batches(data, self.batch_size))
                generator = torch.Generator().manual_seed(self.seed)
                chosen = torch.randperm(total, generator=generator)[: self.max_teacher_images].sort().values
            x, indices = _collect(data, chosen, self.batch_size)
            if teacher is None:
                from trojanguard.detect.cognitive_distillation import CognitiveDistillation

                teacher = CognitiveDistillation(self.model, show_progress=self.show_progress)
            scores = torch.as_tensor(teacher.score(x)).detach().float().flatten().cpu()
            if len(scores) != len(x):
                raise DataError(f"teacher: its score() returned {len(scores)} values for {len(x)} images")
        if len(x) < MIN_TEACHER_IMAGES:
            raise DataError(f"data: need at least {MIN_TEACHER_IMAGES} images to fit, got {len(x)}")
        if not torch.isfinite(scores).all():
            raise DataError("teacher: scores must be finite; got NaN or ±Inf")
        low, high = float(scores.min()), float(scores.max())
        if high - low <= CONSTANT_SCORES_RTOL * max(1.0, abs(low), abs(high)):
            raise DataError(f"teacher: its scores of the {len(scores)} images are all equal (within float rounding: "
                            f"{low:.7g} … {high:.7g}), so there is no ranking to learn; an untrained or degenerate "
                            "model gives this under CD — fit on the model under suspicion and more varied data")
        tap = FeatureTap(self.model, self.layer)
        inputs = self._inputs(tap, x)
        self.layer = tap.layer_name
        self.input_shape = tuple(x.shape[1:])
        self.head = fit_head(inputs, scores, hidden=self.hidden, objective=self.objective, epochs=self.epochs,
                             lr=self.lr, weight_decay=self.weight_decay, seed=self.seed)
        self.teacher_scores, self.teacher_indices = scores, indices
        self._scorer = None
        return self

    def as_module(self, model: nn.Module | None = None) -> AmortizedScorer:
        """A new :class:`AmortizedScorer` (``x -> (logits, score)``, one forward pass) on a private copy of
        ``model`` (default: the detector's model; pass the same weights, e.g. a reloaded copy)."""
        self._require_fit("AmortizedCD")
        return AmortizedScorer(self.model if model is None else model, self.layer, self.head, self.probabilities)

    # ------------------------------------------------------------------------------------------ internals
    @torch.no_grad()
    def _inputs(self, tap: FeatureTap, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head_inputs(feature, logits, self.probabilities).double().cpu()
                          for _, logits, feature in self._tapped(tap, x)])


def head_inputs(feature: torch.Tensor, logits: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """What the head reads: pooled feature ``(N, D)``, with the predicted distribution ``(N, K)`` appended."""
    if not probabilities:
        return feature
    distribution = torch.softmax(logits, dim=1)
    if distribution.dtype != feature.dtype:
        distribution = distribution.to(feature.dtype)
    return torch.cat([feature, distribution], dim=1)


class AmortizedHead(nn.Module):
    """``(N, D) -> (N,)``: standardisation ``(z − mean) / scale`` then an MLP (one hidden ReLU layer of width
    ``hidden``, or linear when 0)."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, hidden: int):
        super().__init__()
        dim = len(mean)
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("scale", scale.float().clone())
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden \
            else nn.Sequential(nn.Linear(dim, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers((z - self.mean) / self.scale).flatten()

    def folded(self) -> nn.Sequential:
        """The same function without the standardisation step: it is folded into the first linear layer
        (``W' = W / scale``, ``b' = b − W' mean``), one fewer graph node; equal up to float rounding."""
        layers = [_copy_linear(m) if isinstance(m, nn.Linear) else m for m in self.layers]
        first = layers[0]
        with torch.no_grad():
            weight = self.layers[0].weight.double() / self.scale.double()
            first.weight.copy_(weight.float())
            first.bias.copy_((self.layers[0].bias.double() - weight @ self.mean.double()).float())
        return nn.Sequential(*layers).requires_grad_(False)


def _copy_linear(linear: nn.Linear) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features)
    out.load_state_dict(linear.state_dict())
    return out


@single_thread()
def fit_head(inputs: torch.Tensor, scores: torch.Tensor, *, hidden: int = DEFAULT_HIDDEN, objective: str = "rank",
             epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
             seed: int = 0) -> AmortizedHead:
    """Train an :class:`AmortizedHead` on ``inputs`` ``(n, D)`` to reproduce the teacher's ``scores`` ``(n,)``
    (full-batch Adam, ``epochs`` steps; deterministic for ``seed``)."""
    check_choice("objective", objective, OBJECTIVES)
    inputs = inputs.double()
    mean, scale = inputs.mean(0), inputs.std(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant inputs: left unscaled
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AmortizedHead(mean, scale, hidden)
    z = inputs.float()
    target = ((scores - scores.mean()) / scores.std()).float()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    weights = _pair_weights(target) if objective == "rank" else None
    head.train()
    for _ in range(epochs):
        output = head(z)
        loss = _rank_loss(output, weights) if objective == "rank" else F.mse_loss(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval().requires_grad_(False)


def _pair_weights(target: torch.Tensor) -> torch.Tensor:
    """``w[i, j] ∝ max(0, t_i − t_j)``: pair (i, j) asks the head to score i above j, as much as the teacher
    separates them; normalised to sum 1."""
    weights = (target[:, None] - target[None, :]).clamp_min(0)
    return weights / weights.sum()


def _rank_loss(output: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted pairwise logistic loss ``Σ w_ij · log(1 + exp(−(s_i − s_j)))`` (RankNet), in row chunks."""
    total = output.new_zeros(())
    for start in range(0, len(output), RANK_PAIR_CHUNK):
        rows = output[start : start + RANK_PAIR_CHUNK]
        total = total + (weights[start : start + RANK_PAIR_CHUNK] * F.softplus(output[None, :] - rows[:, None])).sum()
    return total


class AmortizedScorer(FeatureTap):
    """``forward(x) -> (logits (N, K), score (N,))``: the model's logits and the head's suspicion from the same
    forward pass. Pure tensor operations, exportable to ONNX."""

    def __init__(self, model: nn.Module, layer: str, head: AmortizedHead, probabilities: bool):
        super().__init__(model, layer)
        self.head = head.folded()
        self.probabilities = probabilities

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = super().forward(x)
        # squeeze(1), not flatten(): one graph node instead of a dynamic Shape/Slice/Concat/Reshape chain
        return logits, self.head(head_inputs(feature, logits, self.probabilities)).squeeze(1)


def _collect(data, chosen: torch.Tensor | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``data`` at positions ``chosen`` (all when None) as one tensor, with their positions."""
    kept, positions, shape = [], [], None
    for xb, start in iter_image_batches(data, batch_size):
        if shape is None:
            shape = tuple(xb.shape[1:])
        elif tuple(xb.shape[1:]) != shape:
            raise DataError(f"data: images of shape {tuple(xb.shape[1:])} after {shape}")
        index = torch.arange(start, start + len(xb))
        if chosen is not None:
            mask = torch.isin(index, chosen)
            xb, index = xb[mask], index[mask]
        kept.append(xb.float().cpu())
        positions.append(index)
    if not kept:
        raise DataError("data: no images to fit on")
    return torch.cat(kept), torch.cat(positions)

