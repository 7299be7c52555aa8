"""Class-conditional Mahalanobis distance on one layer's features, with a robust fit (one forward pass).

Features are a chosen layer's output, globally average-pooled to ``(N, D)``. The reference data fit one
Gaussian per class with a shared (tied) covariance, as in the Mahalanobis detector of Lee et al. (NeurIPS
2018); an input's score is its Mahalanobis distance to the mean of the class the model predicts for it
(or to the nearest class mean). A trigger drives the prediction to the target class without the target
class's content, so triggered inputs sit far from that class's clean mean: higher = more suspicious.

Why the fit is robust. When the reference set is itself poisoned (the "screen a training set" use, or a
guard fitted on scraped data), the poison is a minority of the whole set but may be *half or more of the
target class*. A plain fit then pulls the target mean toward the poison and inflates the covariance along
the poison direction, and the poison hides (measured on the zoo: docs/guard.md, "The feature-space detector"). The robust fit follows
robust LDA (Hubert & Van Driessen, CSDA 2004): each class location is an MCD-style location — the mean of
the most concentrated ``support_fraction`` of the class (h-subset) found by concentration steps from
several starts — the shared scatter is the Ledoit-Wolf shrunk covariance of the most central
``support_fraction`` of all residuals, the two are alternated, then one reweighting step keeps every
sample whose squared distance is under the χ²_D 97.5 % quantile (scaled so the median matches χ²_D's) and
refits on them. ``support_fraction=0.5`` is MCD's maximal-breakdown default; it is not tuned to our zoo.
A class whose majority is poison (clean-label attacks poisoning most of the target class, or a dirty-label
attack at 10 % whose poison outnumbers the target class's own images) is beyond any class-wise estimator's
breakdown point; the fit then describes the poison and the detector misses it — or ranks the class's clean
images as the outliers.

The typicality prefilter (``typical_layer``, on by default). The poison is a minority of the *whole* set even
where it is most of its class. So before the class fit, one class-agnostic robust fit (one location, the same
MCD-style estimator and reweighting) runs on an earlier layer's pooled output — by default the layer at half
the network's depth, where features describe texture and parts rather than classes — and the class statistics
are fitted only on the samples it calls typical (in all directions and in the leading principal ones:
:func:`class_agnostic_fit`). A class with fewer typical members than a fit needs (a warning
names it: a class made mostly of globally atypical images is what poison that outnumbers its class looks like, but
so is a class a trusted reference set describes well) is fitted on its more typical half, ranked by the same fit
(``typical_fallback="half"``, default), or on all its members as without the prefilter (``"all"``). Why half: where
the poison is the less typical part of its class, the more typical half is mostly the class's own images, and a
half is what the robust class fit can then trim; all members let poison that outnumbers the class describe it.
Measured (benchmarks/RESULTS.md, "The screened draw's spread, and the prefilter's fallback"): the colour filter on
grey digits, the one screened draw of four whose target class had 2 typical members of 55: AUROC 0.04 with
``"all"``, 1.00 with ``"half"``; elsewhere (colour digits, 1 % and 5 % poison) within 0.01.
Where a trigger is common in the whole set (a source-specific backdoor with correctly labelled covers) the prefilter
can keep a class's poison and drop its own images; ``fit_features(..., left_out=)`` then leaves given images out of
the class fits too — the ensemble passes each class's easier half by its shallow label probe (``Ensemble``'s
``probe_filter``). Scoring is unchanged: every input is still measured at ``layer``. Measured (benchmarks/RESULTS.md,
"The typicality prefilter"): on colour digits, where no colour cue separates the poison, it lifts the mean AUROC over
the implanted families from 0.66 to 0.87; it is chosen by principle (the breakdown argument above), not on those
families. The cost is the fit's: one more pooled layer kept during the same forward pass, one more robust fit.

How much reference data the fit needs (checked by :meth:`FeatureMahalanobis.fit`):

- *per class*: a class location must be the mean of at least two samples, or the class has no spread and
  its members' residuals are exactly zero — the shared covariance then collapses and scores reach 1e14 or
  ``inf``. The robust location averages ``⌈support_fraction · m⌉`` of a class's ``m`` members, so a class
  needs ``m ≥ 3`` at the default fraction (2 for the plain fit). Classes with fewer members get no centre
  (inputs predicted as them are scored against the nearest fitted centre) and a :class:`SampleSizeWarning`;
  no class with enough members, or no variation within any class (identical images), is a DataError.
- *covariance*: ``D`` features need more than ``D`` residual degrees of freedom (``n − K`` for ``n`` samples
  in ``K`` classes; the robust scatter uses ``support_fraction · n`` of them) for the sample covariance to
  be invertible. Below that the estimate is Ledoit-Wolf shrinkage toward a scaled identity in the
  directions the data do not span: defined, but the metric there is the shrinkage target's — a warning
  recommends ``⌈(D + K + 1) / support_fraction⌉`` images.
- *rare classes*: a class with under a quarter of the average class count rests on few samples, and a
  poisoned minority of the data can be most of it — beyond the robust fit's 50 % breakdown point. Warned
  about; fit on trusted reference data instead (``screen --reference``).

``fit_warnings`` keeps these messages; ``save(path)`` / ``FeatureMahalanobis.load(path, model)`` store a fit
as safetensors (tensors + JSON metadata, never pickle), bound to the model's weights by their SHA-256.

The score is pure tensor operations inside :class:`FeatureScorer`, an ``nn.Module`` returning
``(logits, score)`` from one forward pass (a forward hook keeps the layer's output while the forward
pass runs on), so it exports to ONNX and runs inside :class:`trojanguard.guard.Guard`.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from trojanguard.detect._feature_detector import FeatureDetector, Features
from trojanguard.detect.base import SampleSizeWarning
from trojanguard.errors import DataError, ModelLoadError, check_choice
from trojanguard.models.features import FeatureTap, is_compiled, module_by_name
from trojanguard.models.io import model_sha256, read_fit_file

CLASS_RULES = ("predicted", "nearest")  # which class mean a sample is measured against
DEFAULT_SUPPORT_FRACTION = 0.5  # MCD's maximal-breakdown h ≈ n/2
TYPICAL_FALLBACKS = ("half", "all")  # what a class with too few typical members is fitted on (module docstring)
REWEIGHT_QUANTILE = 0.975  # MCD's reweighting step: keep samples under the χ²_D 97.5 % quantile
RANDOM_STARTS = 8  # random members of each class used as starts of the concentration steps (+ mean, median)
CONCENTRATION_STEPS = 20  # C-steps per start (they converge in a few; each never increases the objective)
ALTERNATIONS = 3  # location ↔ scatter rounds before reweighting
RARE_CLASS_FRACTION = 0.25  # a class under this fraction of the average class count is "rare" (module docstring)
FILE_FORMAT = "trojanguard-feature-mahalanobis/1"


class FeatureMahalanobis(FeatureDetector):
    """Mahalanobis distance of a layer's pooled features to the predicted class's mean (robust tied fit).

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] and returning ``(N, K)`` logits;
            never modified (the detector and its modules run a private copy).
        layer: module whose output is the feature (``(N, C', H', W')`` maps are averaged over space,
            ``(N, D)`` used as is); default: the last 4-D output before global pooling.
        rule: ``"predicted"`` (distance to the mean of the predicted class, default) or ``"nearest"``
            (distance to the nearest class mean).
        robust: robust fit (default) or the plain one (class means + Ledoit-Wolf covariance of all samples).
        support_fraction: fraction of each class / of all residuals in the robust h-subsets, in [0.5, 1).
        batch_size: images per forward pass when fitting and scoring.
        seed: picks the random starts of the concentration steps.
        typical_layer: the layer of the class-agnostic typicality prefilter (module docstring): ``"auto"``
            (default: the layer at half the network's depth), a module name, or None (no prefilter: every
            sample of a class enters its fit). Read during the fit's forward pass; scoring does not use it.
        typical_fallback: what a class with too few typical members is fitted on (module docstring): ``"half"``
            (default: its more typical half) or ``"all"`` (all its members).
        show_progress: progress bar over batches.

    After :meth:`fit`: ``class_means`` ``(K, D)``, ``covariance`` ``(D, D)``, ``support`` (bool per reference
    sample: used by the final fit — False marks the reference samples the fit treated as outliers or that belong
    to a class too small to fit), ``present`` (bool per class: has a centre), ``class_counts`` (reference samples
    per class), ``typical`` (bool per reference sample: the prefilter called it typical; all True without one),
    ``left_out`` (the :meth:`fit_features` argument, None without it),
    ``fit_warnings`` (sample-size warnings of the fit, module docstring), ``input_shape`` ``(C, H, W)``.
    """

    FIT_CALL = "fit(reference_data)"
    SCORE_DESCRIPTION = "feature distance"

    def __init__(self, model: nn.Module, *, layer: str | None = None, rule: str = "predicted",
                 robust: bool = True, support_fraction: float = DEFAULT_SUPPORT_FRACTION, batch_size: int = 256,
                 seed: int = 0, typical_layer: str | None = "auto", typical_fallback: str = "half",
                 show_progress: bool = True):
        check_choice("rule", rule, CLASS_RULES)
        check_choice("typical_fallback", typical_fallback, TYPICAL_FALLBACKS)
        if not 0.5 <= support_fraction < 1:
            raise ValueError(f"support_fraction: expected a fraction in [0.5, 1), got {support_fraction}")
        super().__init__(model, layer=layer, batch_size=batch_size, show_progress=show_progress)
        self.rule, self.robust, self.support_fraction, self.seed = rule, robust, support_fraction, seed
        if typical_layer not in (None, "auto"):
            module_by_name(self.model, typical_layer)  # validates the name up front
        self.typical_layer, self.typical_fallback = typical_layer, typical_fallback
        self.typical: torch.Tensor | None = None
        self.left_out: torch.Tensor | None = None
        self.class_means: torch.Tensor | None = None
        self.covariance: torch.Tensor | None = None
        self.present: torch.Tensor | None = None
        self.support: torch.Tensor | None = None
        self.class_counts: torch.Tensor | None = None
        self.fit_warnings: list[str] = []

    def __repr__(self) -> str:
        keys = ("layer", "rule", "robust", "support_fraction", "typical_layer", "typical_fallback", "batch_size",
                "seed")
        return f"FeatureMahalanobis({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    @property
    def fitted(self) -> bool:
        return self.class_means is not None

    # ------------------------------------------------------------------------------------------ public API
    def fit(self, reference_data, labels: torch.Tensor | None = None) -> FeatureMahalanobis:
        """Fit class means and the shared covariance on ``reference_data`` (tensor, ImageDataset, Dataset,
        DataLoader of images in [0, 1]); ``labels`` ``(N,)`` if known, else the model's predictions are used
        (the realistic case for unlabeled incoming data). Returns ``self``."""
        return super().fit(reference_data, labels)

    def fit_features(self, features: Features, labels: torch.Tensor | None = None, *,
                     left_out: torch.Tensor | None = None) -> FeatureMahalanobis:
        """:meth:`fit` on features already extracted (``extract_features``, or shared with other detectors on the
        same layer); ``labels`` as in :meth:`fit`. ``left_out``: bool ``(n,)``, fit images the class statistics must
        not be fitted on besides the ones the prefilter drops (the ensemble's label-probe filter: each class's
        easier half, :func:`~trojanguard.detect.label_probe.easier_half`); they are still scored, and a class
        that keeps too few images falls back as the prefilter's does, the left-out images taken last."""
        self._check_layer(features)
        classes, num_classes = features.classes(labels), features.num_classes
        typical, typicality = self._typical(features)
        called_typical = typical
        if left_out is not None:
            left_out = torch.as_tensor(left_out).bool().flatten()
            if left_out.shape != typical.shape:
                raise ValueError(f"left_out: expected one flag per fit image ({len(typical)}), got "
                                 f"{tuple(left_out.shape)}")
            typical = typical & ~left_out
            if typicality is not None:
                typicality = torch.where(left_out, torch.full_like(typicality, math.inf), typicality)
        shape, features = features.shape, features.features
        counts = torch.bincount(classes, minlength=num_classes)
        fitted = counts >= self.min_class_samples
        if not fitted.any():
            raise DataError(f"reference_data: expected at least {self.min_class_samples} images of one class "
                            f"({'labelled' if labels is not None else 'predicted'}) to fit class statistics, got "
                            f"{len(features)} images with class counts {counts.tolist()}")
        # a class is fitted on its typical members, or on all of them when too few are typical (module docstring)
        typical_counts = torch.bincount(classes[typical], minlength=num_classes)
        unfiltered = fitted & (typical_counts < self.min_class_samples)
        keep = fitted[classes] & (typical | unfiltered[classes])
        if self.typical_fallback == "half" and typicality is not None:
            for k in unfiltered.nonzero().flatten().tolist():
                members = (classes == k).nonzero().flatten()
                taken = max(self.min_class_samples, math.ceil(len(members) / 2))
                keep[members] = False
                keep[members[typicality[members].argsort()[:taken]]] = True
        fit = robust_tied_fit if self.robust else plain_tied_fit
        means, covariance, support = fit(features[keep], classes[keep], num_classes,
                                         support_fraction=self.support_fraction, seed=self.seed)
        if float(covariance.diagonal().mean()) <= 1e-30:  # only the invertibility floor: zero residuals
            raise DataError(f"reference_data: the features of the {int(keep.sum())} images do not vary within any "
                            "class (identical images?), so no covariance can be estimated; fit on varied images")
        self.class_means, self.covariance = means.float(), covariance.float()
        self.support = torch.zeros(len(features), dtype=torch.bool)
        self.support[keep] = support
        self.present, self.class_counts, self.typical = fitted, counts, called_typical
        self.left_out = left_out
        self.input_shape = shape
        self._scorer = None
        self.fit_warnings = sample_size_warnings(counts, features.shape[1], self.min_class_samples,
                                                 self.support_fraction if self.robust else 1.0)
        if unfiltered.any():
            self.fit_warnings.append(
                f"reference_data: classes {unfiltered.nonzero().flatten().tolist()} have fewer than "
                f"{self.min_class_samples} images the typicality prefilter calls typical"
                f"{'' if left_out is None else ' outside the label-probe filter'} "
                f"({typical_counts[unfiltered].tolist()} of {counts[unfiltered].tolist()}), so they are fitted on "
                f"{'their more typical half' if self.typical_fallback == 'half' else 'all their images'}; a class made "
                "mostly of atypical images is what poison that outnumbers its class looks like, and there the fit may "
                "describe the poison: screen such a class against trusted reference data")
        for message in self.fit_warnings:
            warnings.warn(message, SampleSizeWarning, stacklevel=2)
        return self

    def _typical(self, features: Features) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(typical, typicality)``: bool per sample, inside the class-agnostic robust fit of ``typical_layer``'s
        features (module docstring), and each sample's squared distance in that fit (lower: more typical); all True
        and None without a prefilter."""
        if self.typical_layer is None or (self.typical_layer == "auto" and is_compiled(self.model)):
            return torch.ones(len(features.features), dtype=torch.bool), None  # a compiled model has no inner layer
        if features.typical is None:
            raise ValueError(f"features: expected features extracted with typical_layer={self.typical_layer!r} "
                             "(this detector's prefilter), got features without them; pass typical_layer to "
                             "extract_features, or build the detector with typical_layer=None")
        if self.typical_layer not in ("auto", features.typical_layer):
            raise ValueError(f"features: expected the prefilter layer {self.typical_layer!r}, got features of "
                             f"{features.typical_layer!r}")
        self.typical_layer = features.typical_layer
        location, scatter, typical = class_agnostic_fit(features.typical, self.support_fraction, self.seed)
        return typical, _squared_distances(features.typical, location, whitening_matrix(scatter))

    @property
    def min_class_samples(self) -> int:
        """Fewest members of a class whose location is a mean of at least two of them (module docstring)."""
        if not self.robust:
            return 2
        count = 2
        while math.ceil(self.support_fraction * count) < 2:
            count += 1
        return count

    def save(self, path) -> Path:
        """Write the fit to ``path`` (``.safetensors``: tensors and JSON metadata, no pickle) and return it."""
        from safetensors.torch import save_file


        self._require_fit("FeatureMahalanobis.save")
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"path: expected a file name ending in .safetensors, got {str(path)!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FILE_FORMAT, "model_sha256": model_sha256(self.model), "layer": self.layer,
                    "rule": self.rule, "robust": self.robust, "support_fraction": self.support_fraction,
                    "typical_layer": self.typical_layer, "typical_fallback": self.typical_fallback,
                    "input_shape": list(self.input_shape),
                    "fit_warnings": self.fit_warnings}
        tensors = {"class_means": self.class_means, "covariance": self.covariance, "present": self.present,
                   "class_counts": self.class_counts}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"trojanguard": json.dumps(metadata)})
        return path

    @classmethod
    def load(cls, path, model: nn.Module, *, batch_size: int = 256, show_progress: bool = True
             ) -> FeatureMahalanobis:
        """A fitted detector from a file written by :meth:`save`, for ``model`` (the same weights it was fitted
        on: checked by SHA-256). Never unpickles; a file of another kind is a ModelLoadError naming it."""
        meta, tensors = read_fit_file(path, "detector_file", "a FeatureMahalanobis fit written by FeatureMahalanobis.save")
        needed = ("class_means", "covariance", "present", "class_counts")
        if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT or any(k not in tensors for k in needed):
            raise ModelLoadError(f"detector_file: {path}: expected a FeatureMahalanobis fit ({FILE_FORMAT}), got a "
                                 "safetensors file without its metadata or tensors")
        means, covariance = tensors["class_means"].float(), tensors["covariance"].float()
        present, counts = tensors["present"].bool(), tensors["class_counts"].long()
        k, d = means.shape if means.dim() == 2 else (-1, -1)
        if covariance.shape != (d, d) or present.shape != (k,) or counts.shape != (k,) or not present.any():
            raise ModelLoadError(f"detector_file: {path}: inconsistent shapes (class_means {tuple(means.shape)}, "
                                 f"covariance {tuple(covariance.shape)}, present {tuple(present.shape)})")
        if meta.get("model_sha256") != model_sha256(model):
            raise ModelLoadError(f"detector_file: {path}: expected a fit of this model (weights sha256 "
                                 f"{model_sha256(model)[:12]}…), got one of another model "
                                 f"({str(meta.get('model_sha256'))[:12]}…); fit the detector on this model")
        detector = cls(model, layer=meta["layer"], rule=meta["rule"], robust=meta["robust"],
                       support_fraction=meta["support_fraction"], typical_layer=meta.get("typical_layer"),
                       typical_fallback=meta.get("typical_fallback", "all"),
                       batch_size=batch_size, show_progress=show_progress)
        detector.class_means, detector.covariance, detector.present = means, covariance, present
        detector.class_counts, detector.input_shape = counts, tuple(meta["input_shape"])
        detector.fit_warnings = list(meta.get("fit_warnings") or [])
        return detector

    def as_module(self, model: nn.Module | None = None) -> FeatureScorer:
        """A new :class:`FeatureScorer` (``x -> (logits, score)``, one forward pass) on a private copy of
        ``model`` (default: the detector's model; pass the same weights, e.g. a reloaded copy)."""
        self._require_fit("FeatureMahalanobis")
        return FeatureScorer(self.model if model is None else model, self.layer, self.class_means,
                             self.covariance, self.present, self.rule)



class FeatureScorer(FeatureTap):
    """``forward(x) -> (logits (N, K), score (N,))``: the model's logits and the Mahalanobis distance of the
    pooled feature to the predicted (or nearest) class mean. Pure tensor operations, exportable to ONNX.

    The fit is stored whitened: ``W`` with ``W Wᵀ = Σ⁻¹`` and centres ``μ W``, so the distance is the
    Euclidean norm of ``f W − μ W``. Classes absent from the reference data have no centre; an input
    predicted as one of them is scored against the nearest centre.
    """

    def __init__(self, model: nn.Module, layer: str, class_means: torch.Tensor, covariance: torch.Tensor,
                 present: torch.Tensor, rule: str = "predicted"):
        super().__init__(model, layer)
        whitening = whitening_matrix(covariance.double())
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("centres", (class_means.double() @ whitening).float())
        self.register_buffer("present", present.clone())
        self.register_buffer("present_centres", self.centres[present].clone())
        self.rule = rule
        self.all_present = bool(present.all())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = super().forward(x)
        return logits, self.head(logits, feature)

    def head(self, logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The score ``(N,)`` from the logits ``(N, K)`` and pooled feature ``(N, D)`` of one forward pass."""
        if self.rule == "predicted" and self.all_present:
            # the serving path, in as few graph nodes as possible: f W − c_k is one Gemm (beta = −1)
            difference = torch.addmm(self.centres[logits.argmax(1)], feature, self.whitening, beta=-1)
            return torch.linalg.vector_norm(difference, dim=1)
        z = feature @ self.whitening
        if self.rule == "nearest" or not self.all_present:
            # the nearest centre from ‖z‖² − 2 z·c + ‖c‖² (no (N, K, D) tensor), its distance computed directly:
            # the expansion loses ~1e-4 of the distance to cancellation when ‖z‖ ≫ the distance
            centres = self.present_centres
            squared = (z * z).sum(1, keepdim=True) - 2 * z @ centres.T + (centres * centres).sum(1)
            nearest = torch.linalg.vector_norm(z - centres[squared.argmin(1)], dim=1)
            if self.rule == "nearest":
                return nearest
        predicted = logits.argmax(1)
        distance = torch.linalg.vector_norm(z - self.centres[predicted], dim=1)
        if not self.all_present:
            distance = torch.where(self.present[predicted], distance, nearest)
        return distance


def sample_size_warnings(counts: torch.Tensor, dim: int, min_class_samples: int, support_fraction: float
                         ) -> list[str]:
    """Messages for a fit whose data is too small for its estimates (module docstring): classes without a centre,
    rare classes, a covariance with fewer residual degrees of freedom than features. Empty when none applies."""
    messages = []
    counts = counts.long()
    total, fitted = int(counts.sum()), counts >= min_class_samples
    few = [(k, int(c)) for k, c in enumerate(counts.tolist()) if 0 < c < min_class_samples]
    if few:
        messages.append(f"reference_data: classes {[k for k, _ in few]} have fewer than {min_class_samples} images "
                        f"({[c for _, c in few]}): they get no centre of their own and inputs predicted as them are "
                        "scored against the nearest fitted class")
    average = total / len(counts)
    rare = [(k, int(c)) for k, c in enumerate(counts.tolist())
            if c >= min_class_samples and c < RARE_CLASS_FRACTION * average]
    if rare:
        messages.append(f"reference_data: classes {[k for k, _ in rare]} are rare ({[c for _, c in rare]} images, "
                        f"average {average:.1f} per class): a few poisoned images can be most of such a class, where "
                        "the robust fit cannot tell them apart; fit on trusted reference data")
    used = int(counts[fitted].sum())
    recommended = math.ceil((dim + int(fitted.sum()) + 1) / support_fraction)
    if used < recommended:
        messages.append(f"reference_data: {used} images for {dim} features: the covariance has fewer residual "
                        f"degrees of freedom than features, so Ledoit-Wolf shrinkage sets the metric where the data "
                        f"do not reach and scores are less reliable; fit on at least {recommended} images")
    return messages


# ---------------------------------------------------------------------------------------------- estimation
@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the fit's many tiny (D × D, K × n) operations on one thread: with several, every one of them pays
    a thread-pool synchronisation that costs more than the work (measured 15× slower on a loaded 2-core CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


WHITENING_EIGEN_FLOOR = 1e-12  # smallest covariance eigenvalue kept, relative to the largest


def whitening_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """``W`` (D, D) with ``W Wᵀ = Σ⁻¹``: ``‖(f − μ) W‖² = (f − μ)ᵀ Σ⁻¹ (f − μ)`` for row vectors.

    From the eigendecomposition ``Σ = V Λ Vᵀ`` as ``W = V Λ^(-1/2)``, with eigenvalues floored at
    WHITENING_EIGEN_FLOOR × the largest: a Cholesky factor of ``Σ⁻¹`` fails outright when a fit on very few images
    leaves ``Σ`` numerically singular, where this stays defined (directions without spread weigh heavily)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    floor = max(float(eigenvalues.max()), 1e-30) * WHITENING_EIGEN_FLOOR
    return eigenvectors * eigenvalues.clamp_min(floor).rsqrt()


def ledoit_wolf(residuals: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance ``(D, D)`` of residuals ``(n, D)`` about known locations."""
    from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

    covariance, _ = sklearn_ledoit_wolf(residuals.double().numpy(), assume_centered=True)
    covariance = torch.from_numpy(covariance)
    floor = 1e-12 * max(float(covariance.diagonal().mean()), 1e-30)  # all-constant features stay invertible
    return covariance + floor * torch.eye(len(covariance), dtype=covariance.dtype)


@single_thread()
def plain_tied_fit(features: torch.Tensor, classes: torch.Tensor, num_classes: int, **_
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class means and the Ledoit-Wolf covariance of all residuals: ``(means (K, D), Σ (D, D), support)``."""
    means = _class_means(features, classes, num_classes, torch.ones(len(features), dtype=torch.bool))
    return means, ledoit_wolf(features - means[classes]), torch.ones(len(features), dtype=torch.bool)


@single_thread()
def robust_tied_fit(features: torch.Tensor, classes: torch.Tensor, num_classes: int, *,
                    support_fraction: float = DEFAULT_SUPPORT_FRACTION, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Robust class locations and shared scatter (module docstring): ``(means, Σ, support)``.

    features: (n, D) float64; classes: (n,) in [0, K).
    """
    from scipy.stats import chi2

    generator = torch.Generator().manual_seed(seed)
    n, dim = features.shape
    means, covariance, _ = plain_tied_fit(features, classes, num_classes)
    subset = None
    for _ in range(ALTERNATIONS):
        whitening = whitening_matrix(covariance)
        whitened, unwhitening = features @ whitening, torch.linalg.inv(whitening)
        for k in range(num_classes):
            members = whitened[classes == k]
            if len(members):
                means[k] = _concentrated_location(members, support_fraction, generator) @ unwhitening
        squared = _squared_distances(features, means[classes], whitening)
        new_subset = squared.argsort()[: math.ceil(support_fraction * n)].sort().values
        if subset is not None and torch.equal(new_subset, subset):
            break
        subset = new_subset
        covariance = ledoit_wolf((features - means[classes])[subset])
    # reweighting: scale so the median squared distance matches χ²_D's median, keep those under its 97.5 %
    squared = _squared_distances(features, means[classes], whitening_matrix(covariance))
    cutoff = float(squared.median()) / chi2.ppf(0.5, dim) * chi2.ppf(REWEIGHT_QUANTILE, dim)
    support = squared <= cutoff
    means = _class_means(features, classes, num_classes, support, fallback=means)
    return means, ledoit_wolf((features - means[classes])[support]), support


def _class_means(features: torch.Tensor, classes: torch.Tensor, num_classes: int, keep: torch.Tensor,
                 fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the kept members of each class; the fallback (or zeros) where a class has none."""
    means = torch.zeros(num_classes, features.shape[1], dtype=features.dtype) if fallback is None \
        else fallback.clone()
    counts = torch.bincount(classes[keep], minlength=num_classes)
    sums = torch.zeros_like(means).index_add_(0, classes[keep], features[keep])
    has = counts > 0
    means[has] = sums[has] / counts[has, None]
    return means


def class_agnostic_fit(features: torch.Tensor, support_fraction: float = DEFAULT_SUPPORT_FRACTION, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One robust location and scatter for all of ``features`` (n, D) float64, ignoring classes (the typicality
    prefilter's fit, and :class:`~trojanguard.detect.Typicality`'s): ``(location (D,), Σ, support)``.

    A sample is typical (``support``) when the robust fit calls it typical both in all D directions and in the
    leading principal directions (:func:`support_directions`): each fit has a blind spot the other has not — images
    a trigger makes alike hide in the trailing directions of the full fit; a small cluster apart only along a trailing
    direction hides from the leading ones. Location and Σ are then the support's plain mean and Ledoit-Wolf
    covariance in all D dimensions, so scores keep every direction."""
    everyone = torch.zeros(len(features), dtype=torch.long)
    fit = lambda x: robust_tied_fit(x, everyone, 1, support_fraction=support_fraction, seed=seed)
    location, scatter, support = fit(features)
    centred = features - features.mean(0)
    _, singular_values, directions = torch.linalg.svd(centred, full_matrices=False)
    kept = support_directions(singular_values.square(), len(features), support_fraction)
    if kept >= features.shape[1]:
        return location[0], scatter, support
    both = support & fit(centred @ directions[:kept].T)[2]
    if int(both.sum()) < 2:  # no common core: keep the full fit
        return location[0], scatter, support
    location = features[both].mean(0)
    return location, ledoit_wolf(features[both] - location), both


SUPPORT_VARIANCE = 0.99  # the leading principal directions that hold this share of the variance decide the support
MCD_SAMPLES_PER_DIMENSION = 5  # MCD's usual n/p ≥ 5, applied to the h samples its covariance rests on


def support_directions(variances: torch.Tensor, samples: int, support_fraction: float = DEFAULT_SUPPORT_FRACTION
                       ) -> int:
    """How many leading principal directions (``variances``: theirs, descending) the class-agnostic fit's second
    robust fit runs in: the fewest that hold :data:`SUPPORT_VARIANCE` of the variance, and at most
    ``⌈support_fraction · samples⌉ // MCD_SAMPLES_PER_DIMENSION`` (at least one).

    Why. Mahalanobis distance weighs a direction by its inverse variance, so in the trailing directions — a per cent
    of the variance among them — poison that one trigger makes alike sit *closer* to the centre than clean images,
    and that outweighs their distance along the leading directions: the concentration steps then keep them (grey
    SIG, measured in benchmarks/RESULTS.md, "Typicality's support in the leading principal directions"). The sample
    cap keeps the covariance those steps estimate from h samples well-posed on small sets."""
    total = float(variances.sum())
    if total <= 0:
        return 1
    share = variances.cumsum(0) / total
    by_variance = int((share < SUPPORT_VARIANCE).sum()) + 1
    by_samples = math.ceil(support_fraction * samples) // MCD_SAMPLES_PER_DIMENSION
    return max(1, min(by_variance, by_samples, len(variances)))


def _squared_distances(features: torch.Tensor, locations: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    difference = (features - locations) @ whitening
    return (difference * difference).sum(1)


def _concentrated_location(members: torch.Tensor, support_fraction: float, generator: torch.Generator
                           ) -> torch.Tensor:
    """MCD-style location of whitened ``members`` (m, D): from several starts (mean, coordinate median,
    random members), repeat "mean of the h nearest" (concentration steps); keep the start whose h-subset
    has the smallest sum of squared distances."""
    m = len(members)
    h = max(1, math.ceil(support_fraction * m))
    picks = torch.randperm(m, generator=generator)[:RANDOM_STARTS]
    locations = torch.cat([members.mean(0, keepdim=True), members.median(0).values[None], members[picks]])
    squared_norms = (members * members).sum(1)
    for _ in range(CONCENTRATION_STEPS):
        nearest = _pairwise_squared(locations, members, squared_norms).topk(h, dim=1, largest=False).indices
        updated = members[nearest].mean(1)  # (S, D): mean of each start's h nearest members
        if torch.equal(updated, locations):
            break
        locations = updated
    objective = _pairwise_squared(locations, members, squared_norms).topk(h, dim=1, largest=False).values.sum(1)
    return locations[objective.argmin()]


def _pairwise_squared(a: torch.Tensor, b: torch.Tensor, b_squared_norms: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(len(a), len(b))``."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + b_squared_norms).clamp_min(0)
