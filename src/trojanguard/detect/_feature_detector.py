"""What the one-pass feature detectors share (:class:`~trojanguard.detect.FeatureMahalanobis`,
:class:`~trojanguard.detect.AmortizedCD`): the checks of model, layer and batch size, the feature loop through a
:class:`~trojanguard.models.features.FeatureTap`, and ``score`` through a cached copy of ``as_module()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from trojanguard.data.batching import iter_image_batches
from trojanguard.detect.base import Detector
from trojanguard.errors import DataError, check_positive_int
from trojanguard.models.adapters import Classifier, as_classifier
from trojanguard.models.features import FeatureTap, model_device, module_by_name
from trojanguard.progress import progress


class FeatureDetector(Detector):
    """Base of a fitted detector whose :meth:`as_module` returns ``x -> (logits (N, K), score (N,))``.

    Subclasses set ``FIT_CALL`` (how to fit, for error messages) and ``SCORE_DESCRIPTION`` (the progress bar of
    :meth:`score`), and implement ``fit``, ``fitted`` and ``as_module``.
    """

    FIT_CALL = "fit(data)"
    SCORE_DESCRIPTION = "scoring"
    model_kind = Classifier  # the kind of model the detector needs: logits, and a layer's features


    def __init__(self, model: nn.Module, *, layer: str | None, batch_size: int, show_progress: bool):
        model = as_classifier(model).module
        check_positive_int("batch_size", batch_size)
        if layer is not None:
            module_by_name(model, layer)  # validates the name up front
        self.model, self.layer, self.batch_size, self.show_progress = model, layer, batch_size, show_progress
        self.input_shape: tuple[int, ...] | None = None
        self._scorer: nn.Module | None = None

    @property
    def fitted(self) -> bool:
        raise NotImplementedError

    def as_module(self, model: nn.Module | None = None) -> nn.Module:
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
