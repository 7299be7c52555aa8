"""The detectors ``screen`` can run, by name: how each is built and how it scores one batch.

A detector joins with one call to :func:`register_detector` (name, a builder ``(model, **options) ->
detector``, a one-line summary, and optionally a :class:`BatchScorer` subclass when the generic one —
``detector.score(x)`` plus a forward pass for the predicted label — is not the best way to run it).
``available_detectors()`` says which names can run in this installation and why not.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trojanguard.detect.base import Detector, Fitted, LabelWarning, OnePass, Scores
from trojanguard.errors import DataError, TrojanGuardError
from trojanguard.models.adapters import Classifier, as_classifier
from trojanguard.models.features import model_device, working_copy

FIT_CHECKPOINT = "ensemble_fit.csv"  # the ensemble fit's CD scores in screen's output folder (resumable)
POISONCAM_FIT = "poisoncam_fit.safetensors"  # PoisonCAM's fit in screen's output folder (a resumed run loads it)


class DetectorUnavailableError(TrojanGuardError, ValueError):
    """A detector name that exists but cannot run in this installation (or does not exist)."""


class DetectorOptionError(DetectorUnavailableError):
    """A detector option the detector does not take, or a value of the wrong type for it."""


class BatchScorer:
    """Runs a built detector batch by batch: ``scorer(x, first_index) -> (scores (B,), predicted (B,))`` for
    ``x: (B, C, H, W)`` in [0, 1], the samples ``first_index … first_index + B − 1`` of the screened data.

    Generic version: ``detector.score(x)`` and the argmax of a frozen eval-mode copy of the model. Detectors
    with a ``fit(reference_data)`` method that are not yet fitted are fitted in :meth:`prepare`.
    """

    def __init__(self, detector: Detector, model: nn.Module):
        self.detector, self.model = detector, model
        self.device = model_device(model)
        self.net, _ = working_copy(as_classifier(model).module)  # screening needs a Classifier: predicted labels

    @property
    def needs_reference(self) -> bool:
        """True when the detector must be fitted on reference data before it can score."""
        if isinstance(self.detector, Fitted):
            return not self.detector.fitted
        return callable(getattr(self.detector, "fit", None))  # a fit() without ``fitted``: fitted every run

    def prepare(self, reference) -> None:
        """Fit the detector on ``reference`` (tensor, Dataset or DataLoader of images) when it needs it."""
        if self.needs_reference:
            self.detector.fit(reference)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels ``(B,)`` of the model (frozen eval-mode copy)."""
        return Classifier.logits(self.net(x.to(self.device, torch.float32))).argmax(1).cpu()

    def __call__(self, x: torch.Tensor, first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.score(x).float().cpu(), self.predict(x)

    # the run's output folder, where a scorer may keep files that let a killed run resume (set by ``screen``)
    work_dir: Path | None = None

    # a scorer that makes pictures for the report's grid implements Explains: explain(images, indices) -> maps
    # while screening, ``screen`` sets this to the report's grid size: a scorer that makes pictures may keep those
    # of the keep_top highest-scoring samples it has seen, so explain() need not recompute them
    keep_top: int = 0


class CognitiveDistillationScorer(BatchScorer):
    """CD: every sample keyed by its index in the screened data (its noise stream), so a resumed run and a
    sample recomputed for the report get the masks of one uninterrupted run. While screening it keeps the masks
    and cognitive patterns of the ``keep_top`` highest-scoring samples seen (never more), and :meth:`explain`
    recomputes only those it does not hold (samples scored before a resume)."""

    def __init__(self, detector, model):
        super().__init__(detector, model)
        self._kept: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}  # index -> (score, mask, pattern)

    def __call__(self, x: torch.Tensor, first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.keep_top > 0
        parts = list(self.detector.iter_distill(x, keep_masks=keep, first_index=first_index))
        scores = torch.cat([r.scores for _, r in parts]).float()
        if keep:
            for start, result in parts:
                for offset, (score, mask, pattern) in enumerate(zip(result.scores.tolist(), result.masks,
                                                                    result.patterns)):
                    self._kept[start + offset] = (score, mask, pattern)
            if len(self._kept) > self.keep_top:  # highest scores first, ties by index, as the report ranks them
                ranked = sorted(self._kept.items(), key=lambda item: (-item[1][0], item[0]))
                self._kept = dict(ranked[: self.keep_top])
        return scores, self.predict(x)

    def explain(self, x: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        """``masks (K, M, H, W)`` and ``patterns`` = x·m ``(K, C, H, W)`` of samples ``indices`` (images ``x``)."""
        missing = [k for k, index in enumerate(indices) if index not in self._kept]
        computed = {}
        if missing:
            sample_indices = torch.tensor([indices[k] for k in missing])
            parts = [r for _, r in self.detector.iter_distill(x[missing], keep_masks=True, sample_indices=sample_indices)]
            masks, patterns = torch.cat([r.masks for r in parts]), torch.cat([r.patterns for r in parts])
            computed = {indices[k]: (masks[j], patterns[j]) for j, k in enumerate(missing)}
        pairs = [computed[i] if i in computed else self._kept[i][1:] for i in indices]
        return {"masks": torch.stack([m for m, _ in pairs]), "patterns": torch.stack([p for _, p in pairs])}


class OnePassScorer(BatchScorer):
    """A one-pass detector (:class:`~trojanguard.detect.base.OnePass`, e.g. FeatureMahalanobis): logits and score
    from one forward pass of its exportable module."""

    def __init__(self, detector: OnePass, model: nn.Module):
        if not isinstance(detector, OnePass):
            raise TypeError(f"detector: {type(self).__name__} needs a one-pass detector (OnePass: as_module, "
                            f"input_shape); got {type(detector).__name__}")
        super().__init__(detector, model)

    def prepare(self, reference) -> None:
        super().prepare(reference)
        self.module = self.detector.as_module(self.model).to(self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, score = self.module(x.to(self.device, torch.float32))
        return score.float().cpu(), logits.argmax(1).cpu()




class EnsembleScorer(BatchScorer):
    """The ensemble (:class:`~trojanguard.detect.Ensemble`): fitted on the screened data (with its labels, where the
    source has one for every sample), whose scores it keeps, so the batches of the screened data cost no second pass;
    the report's grid shows its CD member's masks (when it has one: the default members have none). With a
    ``work_dir`` (screen's output folder) the fit's CD scores go to ``FIT_CHECKPOINT`` there as they are computed,
    so a killed run resumes its fit instead of distilling everything again."""

    def prepare(self, reference) -> None:
        if self.needs_reference:
            checkpoint = None if self.work_dir is None else self.work_dir / FIT_CHECKPOINT
            # a source with a label for every sample (class folders, given labels) gives the fit its labels: the
            # ensemble's "auto" members are then the label probe's (detect/ensemble.py)
            labels = getattr(reference, "labels_read", None)
            known = labels is not None and reference.source.integer_labels() is not None
            try:
                self.detector.fit(reference, labels if known else None, checkpoint=checkpoint)
            except DataError as error:
                if not (known and str(error).startswith("labels:")):
                    raise
                # labels that are not the model's classes (a folder order of its own): screen without them
                warnings.warn(f"{error}; screened without the labels", LabelWarning, stacklevel=2)
                self.detector.fit(reference, None, checkpoint=checkpoint)

    def explain(self, x: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        """``masks`` and ``patterns`` of the ensemble's first CD member for samples ``indices`` (images ``x``)."""
        return self.detector.explain(x, indices)


class PoisonCAMScorer(BatchScorer):
    """PoisonCAM (:class:`~trojanguard.detect.PoisonCAM`) screens the unlabeled set of a self-supervised *encoder*:
    fitted on the screened data, then every batch scored by its poison classifier; a sample's ``predicted`` is its
    k-means cluster (an encoder has no classes). With a ``work_dir`` the fit is saved there (``POISONCAM_FIT``) and
    a resumed run loads it instead of fitting again."""

    PICTURE_ROWS = ("heat map", "candidate box")  # how the report's grid labels explain()'s two rows

    def __init__(self, detector, model: nn.Module):
        self.detector, self.model = detector, model
        self.device = model_device(model)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The k-means cluster of each image (before the fit: the encoder's output is checked, clusters are 0)."""
        x = x.to(self.device, torch.float32)
        if self.detector.centroids is None:
            self.detector.check_encoder(x)
            return torch.zeros(len(x), dtype=torch.long)
        return self.detector.assign(self.detector.features(x)).cpu()

    def prepare(self, reference) -> None:
        if not self.needs_reference:
            return
        saved = None if self.work_dir is None else self.work_dir / POISONCAM_FIT
        if saved is not None and saved.is_file():
            self.detector.restore(saved)
            return
        self.detector.fit(reference)
        if saved is not None:
            self.detector.save(saved)

    def __call__(self, x: torch.Tensor, first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.score(x.to(self.device, torch.float32)).float().cpu(), self.predict(x)

    def explain(self, x: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        """Heat maps (as ``masks``) and the images with their candidate boxes (as ``patterns``)."""
        return self.detector.explain(x.to(self.device, torch.float32), indices)

    def gallery(self) -> tuple[str, torch.Tensor, list[str]] | None:
        """The report's extra figure: the extracted candidate triggers, best first, each resized to the images'
        size (caption: source sample index and poison score)."""
        triggers = self.detector.result.triggers if self.detector.result is not None else []
        if not triggers:
            return None
        size = self.detector.input_shape[1:]
        crops = torch.stack([torch.nn.functional.interpolate(t.crop[None].float(), size=size, mode="nearest")[0]
                             for t in triggers])
        return ("Extracted candidate triggers", crops, [f"sample {t.index}\nscore {t.score:.2f}" for t in triggers])


@dataclass(frozen=True)
class ScreeningDetector:
    """A detector ``screen`` can run: ``build(model, **options) -> Detector`` and the scorer class that runs it."""

    name: str
    summary: str
    build: Callable[..., Detector]
    scorer: type[BatchScorer] = BatchScorer
    options_of: Callable[[], Callable | None] | None = None


DETECTORS: dict[str, ScreeningDetector] = {}


def register_detector(name: str, build: Callable[..., Detector], summary: str,
                      scorer: type[BatchScorer] = BatchScorer, *,
                      options_of: Callable[[], Callable | None] | None = None) -> None:
    """Make ``name`` available to ``screen(..., detector=name)`` and the ``--detector`` option.
    ``build(model, **options)``; if it names a ``show_progress`` parameter, it receives screen's setting.
    ``options_of()``: the class (or function) whose keyword parameters are the options, when ``build`` only
    passes ``**options`` on; its signature is used to refuse unknown options and values of the wrong type."""
    DETECTORS[name] = ScreeningDetector(name, summary, build, scorer, options_of)


# CD and the feature detector score one batch per call and screen's images/s bar already covers that, so their own
# bars stay off. A builder that names a ``show_progress`` parameter gets screen's setting (``amortized``: the bars of
# its long fit show only when screen shows bars).


def _build_cd(model: nn.Module, **options) -> Detector:
    from trojanguard.detect import CognitiveDistillation

    return CognitiveDistillation(model, **{"show_progress": False, **options})


def _build_ensemble(model: nn.Module, show_progress: bool = True, **options) -> Detector:
    # its fit (CD on every image, when a member) is long: it shows screen's bars
    from trojanguard.detect import Ensemble

    return Ensemble(model, show_progress=show_progress, **options)


def _build_features(model: nn.Module, **options) -> Detector:
    from trojanguard.detect import FeatureMahalanobis

    return FeatureMahalanobis(model, **{"show_progress": False, **options})


def _optional(module: str, attribute: str, name: str) -> Callable[..., Detector]:
    """A builder for a detector class that may be missing from this version of trojanguard."""

    def build(model: nn.Module, show_progress: bool = True, **options) -> Detector:
        cls = _import_optional(module, attribute)
        if cls is None:
            raise DetectorUnavailableError(
                f"detector: {name!r} is not available in this version of trojanguard ({module}.{attribute} is "
                f"missing); available: {', '.join(n for n, why in available_detectors().items() if why is None)}")
        if "show_progress" in inspect.signature(cls).parameters:
            options = {"show_progress": show_progress, **options}
        return cls(model, **options)

    return build


def _import_optional(module: str, attribute: str):
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return None


register_detector("cd", _build_cd, "Cognitive Distillation: per-sample mask optimisation (slow, no fitting)",
                  CognitiveDistillationScorer,
                  options_of=lambda: _import_optional("trojanguard.detect", "CognitiveDistillation"))
register_detector("features", _build_features,
                  "robust class-conditional Mahalanobis distance of features (one forward pass; fitted on the data)",
                  OnePassScorer, options_of=lambda: _import_optional("trojanguard.detect", "FeatureMahalanobis"))
register_detector("spectral", _optional("trojanguard.detect", "SpectralSignature", "spectral"),
                  "Spectral Signatures: squared projection of features on their class's top singular direction "
                  "(one forward pass; fitted on the data)", OnePassScorer,
                  options_of=lambda: _import_optional("trojanguard.detect", "SpectralSignature"))
register_detector("clustering", _optional("trojanguard.detect", "ActivationClustering", "clustering"),
                  "Activation Clustering: per class, 2-means on reduced features, the small cluster of a clean split "
                  "(one forward pass; fitted on the data)", OnePassScorer,
                  options_of=lambda: _import_optional("trojanguard.detect", "ActivationClustering"))
register_detector("typicality", _optional("trojanguard.detect", "Typicality", "typicality"),
                  "class-agnostic robust Mahalanobis distance of a middle layer's features to the whole set's centre "
                  "(one forward pass; fitted on the data)", OnePassScorer,
                  options_of=lambda: _import_optional("trojanguard.detect", "Typicality"))
register_detector("ensemble", _build_ensemble,
                  "the features, clustering and typicality detectors, their robust z-scores averaged, no labels "
                  "(fitted on the data in one forward pass; members=... adds CD or spectral)", EnsembleScorer,
                  options_of=lambda: _import_optional("trojanguard.detect", "Ensemble"))
register_detector("poisoncam", _optional("trojanguard.detect", "PoisonCAM", "poisoncam"),
                  "PoisonCAM: cluster activation masking on a self-supervised ENCODER's features (--model is the "
                  "encoder), candidate triggers, a poison classifier (fitted on the data; flags probability > 0.5)",
                  PoisonCAMScorer, options_of=lambda: _import_optional("trojanguard.detect", "PoisonCAM"))
register_detector("amortized", _optional("trojanguard.detect", "AmortizedCD", "amortized"),
                  "amortised Cognitive Distillation: a head on the model's features, trained on CD's scores of a "
                  "subset of the screened data, scores in one pass",
                  options_of=lambda: _import_optional("trojanguard.detect", "AmortizedCD"))
OPTIONAL_CLASSES = {"amortized": ("trojanguard.detect", "AmortizedCD"),
                    "poisoncam": ("trojanguard.detect", "PoisonCAM"),
                    "spectral": ("trojanguard.detect", "SpectralSignature"),
                    "clustering": ("trojanguard.detect", "ActivationClustering"),
                    "typicality": ("trojanguard.detect", "Typicality")}
# What ``screen`` and ``trojanguard screen --detector`` run when no detector is named. Switching the default (e.g. to
# "ensemble", once chosen by leave-one-family-out on the wider zoo) is this one line.
DEFAULT_DETECTOR = "ensemble"


def available_detectors() -> dict[str, str | None]:
    """``{name: None}`` for detectors that can run here, ``{name: reason}`` for those that cannot."""
    out: dict[str, str | None] = {}
    for name in DETECTORS:
        module, attribute = OPTIONAL_CLASSES.get(name, (None, None))
        missing = module is not None and _import_optional(module, attribute) is None
        out[name] = f"{module}.{attribute} is not in this version of trojanguard" if missing else None
    return out


def build_detector(name: str, model: nn.Module, options: dict | None = None, *, show_progress: bool = True
                   ) -> tuple[Detector, BatchScorer]:
    """The detector ``name`` built on ``model`` with ``options``, and its batch scorer. ``show_progress``: whether
    the detector's own long steps (a fit) may show bars; ``options`` may still set it explicitly."""
    if name not in DETECTORS:
        raise DetectorUnavailableError(f"detector: unknown name {name!r}; expected one of {sorted(DETECTORS)}")
    entry = DETECTORS[name]
    options = dict(options or {})
    check_detector_options(name, (entry.options_of() if entry.options_of else None) or entry.build, options)
    if "show_progress" in inspect.signature(entry.build).parameters:  # a user's builder may not take it
        options = {"show_progress": show_progress, **options}
    detector = entry.build(model, **options)
    if not isinstance(detector, Scores):
        raise TypeError(f"detector: screen needs a detector with score(x) -> (N,) (Scores); {name!r} built a "
                        f"{type(detector).__name__}")
    return detector, entry.scorer(detector, model)


# an annotation's names -> (accepts the value, what the message calls it); other annotations are not checked
OPTION_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "None": (lambda v: v is None, "null"),
}


def check_detector_options(name: str, target: Callable, options: dict) -> None:
    """Refuse an option ``target`` (the detector's class or builder) does not take, or a value whose type does
    not match the parameter's annotation (``int``, ``float``, ``bool``, ``str``, ``None`` and unions of them),
    with a :class:`DetectorOptionError` naming the option, what it expects and what came."""
    parameters = {p.name: p for p in list(inspect.signature(target).parameters.values())[1:]  # [0]: the model
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    unknown = sorted(set(options) - set(parameters))
    if unknown and not takes_any:
        raise DetectorOptionError(f"detector_options: {name!r} does not take these options: {unknown}; it takes "
                                  f"{', '.join(sorted(parameters))}")
    for key, value in options.items():
        if key not in parameters:
            continue
        annotation = parameters[key].annotation
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        kinds = [part.strip() for part in text.split("|")]
        if not text or any(kind not in OPTION_TYPES for kind in kinds):
            continue
        if not any(OPTION_TYPES[kind][0](value) for kind in kinds):
            expected = " or ".join(OPTION_TYPES[kind][1] for kind in kinds)
            raise DetectorOptionError(f"detector_options: {key} expects {expected}, got {value!r}")
