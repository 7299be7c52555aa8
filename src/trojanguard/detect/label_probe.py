"""Label probe: how readily a strongly regularised linear read-out of a middle layer predicts an image's label.

Fit, on the screened (possibly poisoned) set itself: standardise the pooled output of a layer at half the network's
depth (as :class:`~trojanguard.detect.Typicality`'s), and fit a multinomial logistic regression from it to the
images' labels (the model's predictions when no labels are given) with a strong L2 penalty. The penalty is set per
image (scikit-learn's ``C = regularization / n`` for a fit on ``n`` images), so it weighs the same against the mean
log-loss whatever the set's size: the same strong, shared directions qualify on a 300-image draw and on a whole
training set (with one fixed ``C`` a larger set buys the probe more capacity, and clean classes become as easy as
the poison: ``benchmarks/RESULTS.md``, "The label probe's penalty per image"). Score of a fit image = the
log-probability of its label under a probe fitted on the *other* folds (``folds``-fold, stratified): higher = easier =
more suspicious.

Why easy is suspicious. A trigger is one simple pattern that the poison share and that says "target class" whatever
else the image shows, so a read-out that may only use the strongest, most shared directions of the features — a
heavily penalised linear one — picks it up first and is surer of the poison's label than of clean images' labels,
which it must infer from the variable content of a digit, a face or a scene. (Poisoned samples are learned faster
than clean ones, Li et al., NeurIPS 2021, "Anti-Backdoor Learning"; the strongly regularised probe is our stand-in
for "early in training", with no training of the model.) With the labels it also reads what no feature-space distance does: the adaptive
attacks' poison (a low-opacity or split trigger, relabelled) and their cover samples (the same trigger, true labels)
sit together in feature space, but only the poison's labels agree with the trigger. Without labels (the model's
predictions instead) that reading is lost and the probe is much weaker (``benchmarks/RESULTS.md``, "The label
probe").

What it misses: at a low poison rate the trigger is too rare a cue for a penalised read-out, and the poison become
the *hard* images (labels that disagree with their content): on 1 % poison the probe alone inverts; it is a member to
be fused with a feature-space distance, not a detector on its own.

The same reading serves the ensemble's ``features`` member: each class's easier half by the shallow probe
(:func:`easier_half`) is left out of its class fit, so a class that is half poison is still fitted on its own
images (:class:`~trojanguard.detect.Ensemble`, ``probe_filter``).

Scoring new inputs (no labels) uses the probe fitted on the whole fit set and the model's predicted class: pure
tensor operations in :class:`LabelProbeScorer` (one forward pass, exportable to ONNX).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

from trojanguard.detect._feature_detector import AUTO_LAYER, FeatureDetector, Features
from trojanguard.errors import DataError, check_positive_int
from trojanguard.models.features import FeatureTap

# inverse L2 strength per image on standardised features: scikit-learn's C = DEFAULT_REGULARIZATION / (images fitted);
# 0.23 is the C of 10⁻³ the probe was chosen with, on the 230-image folds of the benchmark's 288-image draws (RESULTS.md)
DEFAULT_REGULARIZATION = 0.23
MIN_LABEL_AGREEMENT = 0.5  # a model fits its training labels far above this; below it, labels are not its classes
ABSENT_CLASS_LOG_PROBABILITY = -30.0  # a class the probe never saw: its images are not easy for it
STD_FLOOR = 1e-12  # a feature constant over the fit set is standardised by this (and so stays 0)


def _fit_logistic(z: np.ndarray, classes: np.ndarray, regularization: float):
    """Multinomial logistic regression of ``classes`` on ``z`` at scikit-learn's ``C = regularization / len(z)``
    (the penalty per image: module docstring)."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds; the penalty keeps the fit stable
        return LogisticRegression(C=regularization / len(z), max_iter=1000).fit(z, classes)


def _log_probability(probe, z: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Log-probability of each row's class under ``probe`` (ABSENT_CLASS_LOG_PROBABILITY for a class it lacks)."""
    out = np.full(len(classes), ABSENT_CLASS_LOG_PROBABILITY)
    if len(classes) == 0:
        return out
    column = {int(c): k for k, c in enumerate(probe.classes_)}
    known = np.array([int(c) in column for c in classes])
    if known.any():
        log_p = probe.predict_log_proba(z[known])
        out[known] = log_p[np.arange(known.sum()), [column[int(c)] for c in classes[known]]]
    return np.maximum(out, ABSENT_CLASS_LOG_PROBABILITY)


def out_of_fold_log_probability(z: np.ndarray, classes: np.ndarray, regularization: float, folds: int,
                                seed: int) -> np.ndarray:
    """Each row's log-probability of its class under a probe fitted on the other folds (stratified where each class
    has at least ``folds`` rows, fewer folds otherwise, at least two)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(classes)
    smallest = int(counts[counts > 0].min())
    splits = min(folds, len(classes))
    splitter = (StratifiedKFold(min(splits, smallest), shuffle=True, random_state=seed) if smallest >= 2
                else KFold(splits, shuffle=True, random_state=seed))
    out = np.empty(len(classes))
    for train, test in splitter.split(z, classes):
        if len(np.unique(classes[train])) < 2:
            out[test] = ABSENT_CLASS_LOG_PROBABILITY
            continue
        out[test] = _log_probability(_fit_logistic(z[train], classes[train], regularization), z[test], classes[test])
    return out


def easier_half(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Bool ``(n,)``: in each class of ``classes`` (n,), the half of its images (rounded down) with the highest
    label-probe ``scores`` (n,) — the images the probe finds easiest to label, which is where a dirty-label trigger's
    poison sit (module docstring). The ensemble's ``features`` member leaves them out of its class fits
    (:class:`~trojanguard.detect.Ensemble`, ``probe_filter``); NaN scores count as hardest."""
    scores, classes = torch.as_tensor(scores).double().flatten(), torch.as_tensor(classes).long().flatten()
    if scores.shape != classes.shape:
        raise ValueError(f"scores: expected one score per class entry ({len(classes)}), got {tuple(scores.shape)}")
    easier = torch.zeros(len(scores), dtype=torch.bool)
    ranked = torch.nan_to_num(scores, nan=-math.inf)
    for c in classes.unique().tolist():
        members = (classes == c).nonzero().flatten()
        easier[members[ranked[members].argsort(descending=True, stable=True)[: len(members) // 2]]] = True
    return easier


class LabelProbe(FeatureDetector):
    """Out-of-fold confidence of a strongly regularised linear probe in each image's label (module docstring).

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] and returning ``(N, K)`` logits;
            never modified (the detector runs a private copy).
        layer: ``"auto"`` (default: the layer at half the network's depth,
            :func:`~trojanguard.models.features.middle_feature_layer`), ``"shallow"`` (at a quarter of it,
            :func:`~trojanguard.models.features.shallow_feature_layer`: the ensemble's ``probe-shallow``), a module
            name, or None (the last 4-D output before global pooling).
        regularization: the inverse L2 strength per image on standardised features (a fit on ``n`` images uses
            scikit-learn's ``C = regularization / n``); small = strong.
        folds: folds of the out-of-fold scores of the fit set (at least 2).
        batch_size: images per forward pass. seed: the folds. show_progress: progress bar over batches.

    After :meth:`fit`: ``fit_scores`` (n,) the fit images' out-of-fold log-probabilities of their labels (what
    :class:`~trojanguard.detect.Ensemble` uses for them), ``mean`` and ``scale`` (D,) the standardisation,
    ``weight`` (K, D) and ``bias`` (K,) the probe fitted on every fit image, ``input_shape``.
    """

    FIT_CALL = "fit(data, labels)"
    SCORE_DESCRIPTION = "label probe"
    READS_LABELS = True  # Ensemble.fit gives the labels to this member only (FeatureDetector: False)

    def __init__(self, model: nn.Module, *, layer: str | None = AUTO_LAYER,
                 regularization: float = DEFAULT_REGULARIZATION, folds: int = 5, batch_size: int = 256,
                 seed: int = 0, show_progress: bool = True):
        if not (isinstance(regularization, (int, float)) and np.isfinite(regularization) and regularization > 0):
            raise ValueError(f"regularization: expected a positive finite number, got {regularization!r}")
        check_positive_int("folds", folds)
        if folds < 2:
            raise ValueError(f"folds: expected at least 2, got {folds}")
        super().__init__(model, layer=layer, batch_size=batch_size, show_progress=show_progress)
        self.regularization, self.folds, self.seed = float(regularization), folds, seed
        self.fit_scores: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"LabelProbe(layer={self.layer!r}, regularization={self.regularization!r}, folds={self.folds!r}, "
                f"batch_size={self.batch_size!r}, seed={self.seed!r})")

    @property
    def fitted(self) -> bool:
        return self.weight is not None

    def fit_features(self, features: Features, labels: torch.Tensor | None = None) -> LabelProbe:
        """:meth:`fit` on features already extracted at this detector's layer; ``labels`` (n,) the images' labels
        (the model's predictions when None)."""
        self._check_layer(features)
        classes = features.classes(labels).numpy()
        if len(np.unique(classes)) < 2:
            raise DataError(f"labels: expected images of at least two classes to fit a label probe, got only class "
                            f"{int(classes[0]) if len(classes) else 'none'} ({len(classes)} images)")
        agreement = float((classes == features.predicted.numpy()).mean())
        if labels is not None and agreement < MIN_LABEL_AGREEMENT:
            raise DataError(f"labels: expected the images' training labels in the model's class order; they agree "
                            f"with its predictions on {agreement:.0%} of the {len(classes)} images (class folders "
                            "sorted in another order than the model's classes?)")
        values = features.features.double().numpy()
        mean = values.mean(0)
        scale = np.maximum(values.std(0), STD_FLOOR)
        z = (values - mean) / scale
        self.fit_scores = torch.from_numpy(
            out_of_fold_log_probability(z, classes, self.regularization, self.folds, self.seed))
        probe = _fit_logistic(z, classes, self.regularization)
        num_classes = features.num_classes
        weight = np.zeros((num_classes, z.shape[1]))
        bias = np.full(num_classes, ABSENT_CLASS_LOG_PROBABILITY * 10)  # a class never seen gets ~no probability
        coefficients, intercepts = probe.coef_, probe.intercept_
        if len(probe.classes_) == 2:  # scikit-learn's binary case: one row for the second class
            coefficients = np.vstack([-coefficients / 2, coefficients / 2])
            intercepts = np.array([-intercepts[0] / 2, intercepts[0] / 2])
        weight[probe.classes_] = coefficients
        bias[probe.classes_] = intercepts
        self.mean, self.scale = torch.from_numpy(mean).float(), torch.from_numpy(scale).float()
        self.weight, self.bias = torch.from_numpy(weight).float(), torch.from_numpy(bias).float()
        self.input_shape, self._scorer = features.shape, None
        return self

    def as_module(self, model: nn.Module | None = None) -> LabelProbeScorer:
        """``x -> (logits, score)`` in one forward pass of a private copy of ``model`` (default: the detector's)."""
        self._require_fit("LabelProbe")
        return LabelProbeScorer(self.model if model is None else model, self.layer, self.mean, self.scale,
                                self.weight, self.bias)


class LabelProbeScorer(FeatureTap):
    """``forward(x) -> (logits (N, K), score (N,))``: the probe's log-probability of the model's predicted class,
    on the standardised pooled feature."""

    def __init__(self, model: nn.Module, layer: str | None, mean: torch.Tensor, scale: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor):
        super().__init__(model, layer)
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale.clone())
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = super().forward(x)
        return logits, self.head(logits, feature)

    def head(self, logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The score ``(N,)`` from the logits ``(N, K)`` and pooled feature ``(N, D)`` of one forward pass."""
        z = (feature.float() - self.mean) / self.scale
        log_p = torch.log_softmax(z @ self.weight.T + self.bias, dim=1)
        score = log_p.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
        return score.clamp_min(ABSENT_CLASS_LOG_PROBABILITY)
