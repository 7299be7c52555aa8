"""What the one-pass feature detectors share (:class:`~trojanguard.detect.FeatureMahalanobis`,
:class:`~trojanguard.detect.AmortizedCD`, :class:`~trojanguard.detect.SpectralSignature`,
:class:`~trojanguard.detect.ActivationClustering`): the checks of model, layer and batch size, the feature loop
through a :class:`~trojanguard.models.features.FeatureTap` (:meth:`FeatureDetector.extract_features`, whose
:class:`Features` several detectors on one layer can share), and ``score`` through a cached copy of
``as_module()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from trojanguard.data.batching import iter_image_batches
from trojanguard.detect.base import Detector
from trojanguard.errors import DataError, check_positive_int
from trojanguard.models.adapters import Classifier, as_classifier
from trojanguard.models.features import (
    FeatureTap,
    middle_feature_layer,
    model_device,
    module_by_name,
    pooled_output,
    shallow_feature_layer,
)
from trojanguard.progress import progress

AUTO_LAYER = "auto"  # a detector's layer resolved on the first images it sees: the one at half the network's depth
SHALLOW_LAYER = "shallow"  # likewise, the one at a quarter of its depth (the shallow label probe's)
LAYER_RULES = {AUTO_LAYER: middle_feature_layer, SHALLOW_LAYER: shallow_feature_layer}  # keyword -> resolver


def image_digests(x: torch.Tensor) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each image of ``x`` (N, C, H, W), by its float32 bytes: the same image read
    twice gets the same digest (what lets a detector reuse the scores it computed while fitting)."""
    pixels = x.detach().to("cpu", torch.float32).contiguous().flatten(1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in pixels]


@dataclass
class Features:
    """One forward pass over a dataset: ``features`` (n, D) float64 (a layer's pooled output), ``logits`` (n, K),
    the ``layer`` they come from and the images' ``shape`` (C, H, W)."""

    features: torch.Tensor
    logits: torch.Tensor
    layer: str
    shape: tuple[int, ...]
    digests: list[bytes] | None = None  # one per image (image_digest), when asked for
    typical: torch.Tensor | None = None  # (n, D') float64: the pooled output of ``typical_layer``, when asked for
    typical_layer: str | None = None

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(1)

    def classes(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels`` (n,) checked against the logits' classes, or the predicted classes when None."""
        predicted = self.predicted
        if labels is None:
            return predicted
        classes = torch.as_tensor(labels).long().flatten()
        if classes.shape != predicted.shape:
            raise DataError(f"labels: expected shape ({len(predicted)},), got {tuple(classes.shape)}")
        if classes.min() < 0 or classes.max() >= self.num_classes:
            raise DataError(f"labels: expected classes in [0, {self.num_classes}), got "
                            f"[{int(classes.min())}, {int(classes.max())}]")
        return classes


class FeatureDetector(Detector):
    """Base of a fitted detector whose :meth:`as_module` returns ``x -> (logits (N, K), score (N,))``.

    Subclasses set ``FIT_CALL`` (how to fit, for error messages) and ``SCORE_DESCRIPTION`` (the progress bar of
    :meth:`score`), and implement ``fit``, ``fitted`` and ``as_module``.
    """

    FIT_CALL = "fit(data)"
    SCORE_DESCRIPTION = "scoring"
    model_kind = Classifier  # the kind of model the detector needs: logits, and a layer's features
    typical_layer: str | None = None  # a second layer the fit reads (FeatureMahalanobis's typicality prefilter)
    READS_LABELS = False  # whether an Ensemble gives this member its fit's labels (only the label probe's: True)

    def __init__(self, model: nn.Module, *, layer: str | None, batch_size: int, show_progress: bool):
        model = as_classifier(model).module
        check_positive_int("batch_size", batch_size)
        if layer not in (None, *LAYER_RULES):
            module_by_name(model, layer)  # validates the name up front
        self.model, self.layer, self.batch_size, self.show_progress = model, layer, batch_size, show_progress
        self.input_shape: tuple[int, ...] | None = None
        self._scorer: nn.Module | None = None

    @property
    def fitted(self) -> bool:
        raise NotImplementedError

    def as_module(self, model: nn.Module | None = None) -> nn.Module:
        raise NotImplementedError

    def fit(self, data, labels: torch.Tensor | None = None):
        """Fit on ``data`` (tensor, ImageDataset, Dataset, DataLoader of images in [0, 1]); ``labels`` ``(N,)`` if
        known, else the model's predictions. Returns ``self``: one feature pass, then :meth:`fit_features`."""
        return self.fit_features(self.extract_features(data, typical_layer=self.typical_layer), labels)

    def fit_features(self, features: Features, labels: torch.Tensor | None = None):
        """:meth:`fit` on features already extracted (shared with other detectors on the same layer)."""
        raise NotImplementedError

    def _require_fit(self, where: str) -> None:
        if not self.fitted:
            raise RuntimeError(f"{where}: call {self.FIT_CALL} first")

    @torch.no_grad()
    def score(self, x) -> torch.Tensor:
        """Suspicion ``(N,)`` from the exportable module (built once, on the model's device); higher = more
        suspicious."""
        self._require_fit(f"{type(self).__name__}.score")
        if self._scorer is None:
            self._scorer = self.as_module().to(model_device(self.model))
        device = model_device(self._scorer)
        parts = [self._scorer(xb.to(device, torch.float32))[1].float().cpu()
                 for xb, _ in progress(iter_image_batches(x, self.batch_size), desc=self.SCORE_DESCRIPTION,
                                       enable=self.show_progress)]
        if not parts:
            raise DataError("x: no images to score")
        return torch.cat(parts)

    @torch.no_grad()
    def extract_features(self, data, description: str = "reference features", *, digests: bool = False,
                         typical_layer: str | None = None) -> Features:
        """Logits and the layer's pooled features of every image of ``data`` (one forward pass); sets ``layer``
        to the layer used (the default one when it was None). ``digests``: also each image's content digest.
        ``typical_layer``: also that module's pooled output, in the same pass (``"auto"``: the layer at half the
        network's depth, :func:`~trojanguard.models.features.middle_feature_layer`; none for a compiled model).
        A detector whose ``layer`` is ``"auto"`` resolves it here on ``data``'s first images, the same way
        (``"shallow"``: the layer at a quarter of the depth, :func:`~trojanguard.models.features.shallow_feature_layer`)."""
        if self.layer in LAYER_RULES:
            first = next(iter(iter_image_batches(data, 2)), None)
            if first is None:
                raise DataError("data: no images to fit on")
            self.layer = LAYER_RULES[self.layer](self.model, first[0].to(model_device(self.model), torch.float32))
        tap = FeatureTap(self.model, self.layer)
        features, logits, shape, digest_list = [], [], None, [] if digests else None
        typical, handle, captured = [], None, []
        try:
            for xb, batch_logits, feature in self._tapped(tap, data, description):
                if typical_layer == "auto":  # resolved on the first batch, which then runs again with the hook
                    typical_layer = middle_feature_layer(tap.model, xb[:2].to(model_device(tap.model), torch.float32))
                if handle is None and typical_layer is not None:
                    handle = module_by_name(tap.model, typical_layer).register_forward_hook(
                        lambda module, inputs, output: captured.append(output))
                    tap(xb.to(model_device(tap.model), torch.float32))  # this first batch again, now with the hook
                if handle is not None:
                    typical.append(pooled_output(captured[-1], typical_layer, "typical_layer").double().cpu())
                    captured.clear()
                if digest_list is not None:
                    digest_list.extend(image_digests(xb))
                if shape is None:
                    shape = tuple(xb.shape[1:])
                elif tuple(xb.shape[1:]) != shape:
                    raise DataError(f"reference_data: images of shape {tuple(xb.shape[1:])} after {shape}")
                features.append(feature.double().cpu())
                logits.append(batch_logits.float().cpu())
        finally:
            if handle is not None:
                handle.remove()
        if not features:
            raise DataError("reference_data: no images to fit on")
        self.layer = tap.layer_name
        return Features(torch.cat(features), torch.cat(logits), tap.layer_name, shape, digest_list,
                        torch.cat(typical) if typical else None, typical_layer)

    def _check_layer(self, features: Features) -> None:
        """Adopt the layer of shared ``features`` (when none was chosen, or ``"auto"``), or refuse features of
        another layer."""
        if self.layer in (None, *LAYER_RULES):
            self.layer = features.layer
        elif features.layer != self.layer:
            raise ValueError(f"features: expected features of layer {self.layer!r} (this detector's), got "
                             f"{features.layer!r}")

    @torch.no_grad()
    def _tapped(self, tap: FeatureTap, data, description: str | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(images (B, C, H, W), logits (B, K), pooled feature (B, D))`` per batch of ``data``, ``tap`` run on the
        model's device; a progress bar titled ``description`` when given (and ``show_progress``)."""
        device = model_device(self.model)
        tap.to(device)
        batches = iter_image_batches(data, self.batch_size)
        if description is not None:
            batches = progress(batches, desc=description, enable=self.show_progress)
        for xb, _ in batches:
            logits, feature = tap(xb.to(device, torch.float32))
            yield xb, logits, feature
