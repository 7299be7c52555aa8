"""Spectral Signatures (Tran, Li & Madry, NeurIPS 2018): poison leaves a trace along the top singular direction
of its class's feature covariance.

Fit, on the screened (possibly poisoned) set itself: per class (the model's predicted class, or given labels),
centre the pooled features of one layer on the class mean and take the top right-singular vector ``v_k`` of the
centred matrix (scikit-learn's randomized SVD). A poisoned minority shifts its class's features along one
direction (the trigger's), which dominates the class's spread, so poisoned samples project far out along
``v_k``. Score = the squared projection ``((f − μ_k) · v_k)²``: higher = more suspicious.

Across classes. Tran et al. rank within each class; a screening score is compared across the whole set. By
default (``scale="none"``) the raw squared projection is kept: the class that holds the poison has the largest
top singular value because of it, so its poisoned samples also top the whole set. ``scale="median"`` divides each
class's squared projections by their median over the class's fit samples (clean classes then score alike whatever
their spread); measured worse on the zoo, because the poison is up to half of its class and inflates that
class's median too (``benchmarks/RESULTS.md``).

Scoring new inputs uses the predicted class's ``μ_k``, ``v_k`` and scale: pure tensor operations in
:class:`SpectralScorer` (one forward pass, exportable to ONNX). A class with fewer than ``MIN_CLASS_SAMPLES``
fit samples has no direction; inputs predicted as it score 0 (and the fit warns).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from trojanguard.detect._feature_detector import FeatureDetector, Features
from trojanguard.detect.base import SampleSizeWarning
from trojanguard.errors import DataError, check_choice
from trojanguard.models.features import FeatureTap

SCALES = ("none", "median")  # how a class's squared projections are made comparable across classes
MIN_CLASS_SAMPLES = 3  # a direction and a median from fewer samples describe nothing
SCALE_FLOOR = 1e-12  # relative to the largest class scale: a class of identical features divides by this


class SpectralSignature(FeatureDetector):
    """Spectral signature of a layer's pooled features, per class, fitted on the screened data itself.

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] and returning ``(N, K)`` logits;
            never modified (the detector runs a private copy).
        layer: module whose output is the feature (``(N, C', H', W')`` maps are averaged over space); default:
            the last 4-D output before global pooling.
        scale: ``"none"`` (default: the raw squared projection) or ``"median"`` (divided by the class's median
            squared projection; module docstring).
        batch_size: images per forward pass. seed: the randomized SVD. show_progress: progress bar.

    After :meth:`fit`: ``class_means`` (K, D), ``directions`` (K, D) unit vectors (zero for classes without one),
    ``class_scales`` (K,), ``class_counts`` (K,), ``fit_warnings``, ``input_shape``.
    """

    FIT_CALL = "fit(data)"
    SCORE_DESCRIPTION = "spectral signature"

    def __init__(self, model: nn.Module, *, layer: str | None = None, scale: str = "none", batch_size: int = 256,
                 seed: int = 0, show_progress: bool = True):
        check_choice("scale", scale, SCALES)
        super().__init__(model, layer=layer, batch_size=batch_size, show_progress=show_progress)
        self.scale, self.seed = scale, seed
        self.class_means: torch.Tensor | None = None
        self.directions: torch.Tensor | None = None
        self.class_scales: torch.Tensor | None = None
        self.class_counts: torch.Tensor | None = None
        self.fit_warnings: list[str] = []

    def __repr__(self) -> str:
        return (f"SpectralSignature(layer={self.layer!r}, scale={self.scale!r}, batch_size={self.batch_size!r}, "
                f"seed={self.seed!r})")

    @property
    def fitted(self) -> bool:
        return self.directions is not None

    def fit_features(self, features: Features, labels: torch.Tensor | None = None) -> SpectralSignature:
        """:meth:`fit` on features already extracted (shared with other detectors on the same layer)."""
        from sklearn.utils.extmath import randomized_svd

        self._check_layer(features)
        classes, num_classes = features.classes(labels), features.num_classes
        values = features.features
        dim = values.shape[1]
        means = torch.zeros(num_classes, dim, dtype=torch.float64)
        directions = torch.zeros_like(means)
        scales = torch.ones(num_classes, dtype=torch.float64)
        counts = torch.bincount(classes, minlength=num_classes)
        if not (counts >= MIN_CLASS_SAMPLES).any():
            raise DataError(f"data: expected at least {MIN_CLASS_SAMPLES} images of one class to fit a spectral "
                            f"signature, got class counts {counts.tolist()}")
        for k in torch.nonzero(counts >= MIN_CLASS_SAMPLES).flatten().tolist():
            members = values[classes == k]
            means[k] = members.mean(0)
            centred = (members - means[k]).numpy()
            _, _, vt = randomized_svd(centred, n_components=1, random_state=self.seed)
            directions[k] = torch.from_numpy(vt[0].copy())
            projection = (members - means[k]) @ directions[k]
            scales[k] = float((projection * projection).median()) if self.scale == "median" else 1.0
        scales = scales.clamp_min(SCALE_FLOOR * max(float(scales.max()), 1e-30))
        self.class_means, self.directions, self.class_scales = means.float(), directions.float(), scales.float()
        self.class_counts, self.input_shape, self._scorer = counts, features.shape, None
        few = [k for k, c in enumerate(counts.tolist()) if 0 < c < MIN_CLASS_SAMPLES]
        self.fit_warnings = [] if not few else [
            (f"data: classes {few} have fewer than {MIN_CLASS_SAMPLES} images: no spectral direction, inputs "
            "predicted as them score 0")]
        for message in self.fit_warnings:
            warnings.warn(message, SampleSizeWarning, stacklevel=2)
        return self

    def as_module(self, model: nn.Module | None = None) -> SpectralScorer:
        """``x -> (logits, score)`` in one forward pass of a private copy of ``model`` (default: the detector's)."""
        self._require_fit("SpectralSignature")
        return SpectralScorer(self.model if model is None else model, self.layer, self.class_means, self.directions,
                              self.class_scales)


class SpectralScorer(FeatureTap):
    """``forward(x) -> (logits (N, K), score (N,))``: squared projection of the pooled feature, centred on the
    predicted class's mean, on that class's top singular direction, divided by the class's scale."""

    def __init__(self, model: nn.Module, layer: str, class_means: torch.Tensor, directions: torch.Tensor,
                 class_scales: torch.Tensor):
        super().__init__(model, layer)
        self.register_buffer("class_means", class_means.clone())
        self.register_buffer("directions", directions.clone())
        self.register_buffer("class_scales", class_scales.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = super().forward(x)
        return logits, self.head(logits, feature)

    def head(self, logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The score ``(N,)`` from the logits ``(N, K)`` and pooled feature ``(N, D)`` of one forward pass."""
        k = logits.argmax(1)
        projection = ((feature.float() - self.class_means[k]) * self.directions[k]).sum(1)
        return projection * projection / self.class_scales[k]
