"""Class-agnostic typicality: robust Mahalanobis distance of a middle layer's pooled features to the whole set's centre.

Fit, on the screened (possibly poisoned) set itself: one robust location and scatter for *all* samples at once (the
MCD-style estimator of :class:`~trojanguard.detect.FeatureMahalanobis` with a single class, then its reweighting
step), on the pooled output of a layer at half the network's depth by default — where features describe texture
and parts rather than classes; a sample is typical only if typical both in all directions and in the leading
principal directions (99 % of the variance, :func:`~trojanguard.detect.feature_mahalanobis.class_agnostic_fit`),
where images made alike by one trigger cannot hide by being tight in the trailing ones. Score = the Mahalanobis
distance (all directions) to that location: higher = less typical of the set = more suspicious.

Why class-agnostic. The class-conditional detectors (``features``, ``spectral``, ``clustering``) look for the poison
inside the class it lands in, and a class whose majority is poison (a clean-label attack that poisons most of its
target class, e.g. SIG) is beyond any class-wise estimator's breakdown point: they rank the class's own clean
images as the outliers. The poison is a minority of the *whole* set even then, and a trigger is something the
clean images of no class share, so the whole set's robust fit calls it atypical. It is the same fit as
``FeatureMahalanobis``'s typicality prefilter (:func:`~trojanguard.detect.feature_mahalanobis.class_agnostic_fit`),
used as a score. What it misses: a trigger that does not move the middle layer's pooled features beyond the set's
natural spread (measured in ``benchmarks/RESULTS.md``, "Class-agnostic typicality").

Scoring new inputs is pure tensor operations in :class:`TypicalityScorer` (one forward pass, exportable to ONNX).
"""

from __future__ import annotations

import torch
from torch import nn

from trojanguard.detect._feature_detector import FeatureDetector, Features
from trojanguard.detect.feature_mahalanobis import (
    DEFAULT_SUPPORT_FRACTION,
    class_agnostic_fit,
    whitening_matrix,
)
from trojanguard.errors import DataError
from trojanguard.models.features import FeatureTap

MIN_SAMPLES = 4  # a robust location (half the set) of at least two samples, and a spread around it


class Typicality(FeatureDetector):
    """Robust Mahalanobis distance of a layer's pooled features to the whole set's centre (module docstring).

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] and returning ``(N, K)`` logits;
            never modified (the detector runs a private copy).
        layer: ``"auto"`` (default: the layer at half the network's depth,
            :func:`~trojanguard.models.features.middle_feature_layer`; the default feature layer for a compiled
            model, which has no inner layer), a module name, or None (the last 4-D output before global pooling).
        support_fraction: fraction of the set in the robust h-subset, in [0.5, 1).
        batch_size: images per forward pass. seed: the random starts of the concentration steps.
        show_progress: progress bar over batches.

    After :meth:`fit`: ``location`` (D,), ``covariance`` (D, D), ``support`` (bool per fit sample: inside the fit
    after reweighting), ``input_shape``.
    """

    FIT_CALL = "fit(data)"
    SCORE_DESCRIPTION = "typicality"

    def __init__(self, model: nn.Module, *, layer: str | None = "auto",
                 support_fraction: float = DEFAULT_SUPPORT_FRACTION, batch_size: int = 256, seed: int = 0,
                 show_progress: bool = True):
        if not 0.5 <= support_fraction < 1:
            raise ValueError(f"support_fraction: expected a fraction in [0.5, 1), got {support_fraction}")
        super().__init__(model, layer=layer, batch_size=batch_size, show_progress=show_progress)
        self.support_fraction, self.seed = support_fraction, seed
        self.location: torch.Tensor | None = None
        self.covariance: torch.Tensor | None = None
        self.support: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"Typicality(layer={self.layer!r}, support_fraction={self.support_fraction!r}, "
                f"batch_size={self.batch_size!r}, seed={self.seed!r})")

    @property
    def fitted(self) -> bool:
        return self.location is not None

    def fit_features(self, features: Features, labels: torch.Tensor | None = None) -> Typicality:
        """:meth:`fit` on features already extracted at this detector's layer; ``labels`` are not used (the fit is
        class-agnostic) and accepted for the common interface."""
        self._check_layer(features)
        if len(features.features) < MIN_SAMPLES:
            raise DataError(f"data: expected at least {MIN_SAMPLES} images to fit typicality on, got "
                            f"{len(features.features)}")
        location, covariance, support = class_agnostic_fit(features.features, self.support_fraction, self.seed)
        if float(covariance.diagonal().mean()) <= 1e-30:
            raise DataError(f"data: the features of the {len(features.features)} images do not vary (identical "
                            "images?), so no covariance can be estimated; fit on varied images")
        self.location, self.covariance, self.support = location.float(), covariance.float(), support
        self.input_shape, self._scorer = features.shape, None
        return self

    def as_module(self, model: nn.Module | None = None) -> TypicalityScorer:
        """``x -> (logits, score)`` in one forward pass of a private copy of ``model`` (default: the detector's)."""
        self._require_fit("Typicality")  # FeatureTap checks the layer's name in the given model
        return TypicalityScorer(self.model if model is None else model, self.layer, self.location, self.covariance)


class TypicalityScorer(FeatureTap):
    """``forward(x) -> (logits (N, K), score (N,))``: the Mahalanobis distance of the pooled feature to the fit's
    location, stored whitened (``W Wᵀ = Σ⁻¹``, centre ``μ W``) so it is the Euclidean norm of ``f W − μ W``."""

    def __init__(self, model: nn.Module, layer: str | None, location: torch.Tensor, covariance: torch.Tensor):
        super().__init__(model, layer)
        whitening = whitening_matrix(covariance.double())
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("centre", (location.double() @ whitening).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = super().forward(x)
        return logits, self.head(logits, feature)

    def head(self, logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The score ``(N,)`` from the logits ``(N, K)`` and pooled feature ``(N, D)`` of one forward pass."""
        return torch.linalg.vector_norm(feature.float() @ self.whitening - self.centre, dim=1)
