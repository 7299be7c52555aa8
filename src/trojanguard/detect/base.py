"""The detector protocols: what a detector can do, declared once and checked where it is used.

- :class:`Detector`: ``score(x) -> (N,)`` (higher = more suspicious), ``calibrate`` and ``predict``;
  subclassing it gives the threshold rules below for free. ``screen`` needs only :class:`Scores`.
- :class:`Fitted`: ``fit(data)`` and ``fitted``; ``screen`` fits an unfitted one on reference data first.
- :class:`OnePass`: ``as_module(model) -> nn.Module`` returning ``(logits, score)`` in one forward pass, and the
  ``input_shape`` it was fitted on; what :class:`~trojanguard.guard.Guard` and ONNX export need.
- :class:`Explains`: ``explain(x, indices) -> {name: maps}``, the pictures of the screening report's grid (CD's
  masks and patterns).

The threshold rules and how many clean samples they need: :mod:`trojanguard.thresholds`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from trojanguard.errors import check_choice
from trojanguard.thresholds import CALIBRATION_RULES, quantile_threshold, sigma_threshold


class SampleSizeWarning(UserWarning):
    """A fit or calibration ran on fewer samples than its estimate needs to be reliable (the message says why)."""


class LabelWarning(UserWarning):
    """The labels given with the data cannot be used (e.g. they are not in the model's class order), so a detector
    ran without them; the message says why."""


@runtime_checkable
class Scores(Protocol):
    """Anything ``screen`` can run: ``score(x) -> (N,)``, higher = more suspicious."""

    def score(self, x) -> torch.Tensor: ...


@runtime_checkable
class Fitted(Protocol):
    """A detector that must be fitted on reference data before it scores."""

    @property
    def fitted(self) -> bool: ...

    def fit(self, data, *args, **kwargs): ...


@runtime_checkable
class OnePass(Protocol):
    """A detector that runs inside a served module: ``as_module(model)`` is an ``nn.Module`` mapping
    ``x: (N, C, H, W) -> (logits (N, K), score (N,))`` in one forward pass (exportable to ONNX);
    ``input_shape`` is the ``(C, H, W)`` of its reference data (None before fitting)."""

    input_shape: tuple[int, ...] | None

    def as_module(self, model: nn.Module | None = None) -> nn.Module: ...


@runtime_checkable
class Explains(Protocol):
    """Pictures for the screening report's grid: ``explain(x, indices)`` maps images ``x: (K, C, H, W)``, the
    samples ``indices`` of the screened data, to ``{name: (K, ...) tensor}`` (CD: ``masks``, ``patterns``)."""

    def explain(self, x: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Detector(Protocol):
    """Every detector: ``score``, ``calibrate`` and ``predict``. Subclasses implement :meth:`score`; subclassing
    this protocol gives them the threshold rules below.

    ``calibrate(clean_x, fpr)`` sets the threshold at the ``1 − fpr`` quantile of clean scores, so about
    ``fpr`` of clean inputs are flagged (it needs at least ``⌈1/fpr⌉ − 1`` clean samples, module docstring);
    ``rule="sigma"`` instead uses ``μ + t·σ`` of clean scores. An infinite score is maximally suspicious
    (flagged); only NaN means "not scored".
    """

    threshold: float | None = None

    def score(self, x) -> torch.Tensor:
        raise NotImplementedError

    def calibrate(self, clean_x, fpr: float = 0.01, *, rule: str = "quantile", t: float = 0.5) -> float:
        """Fit the decision threshold on clean reference data and return it."""
        check_choice("rule", rule, CALIBRATION_RULES)
        if not 0 < fpr < 1:
            raise ValueError(f"fpr: expected a false-positive rate in (0, 1), got {fpr}")
        scores = self.score(clean_x).double()
        if rule == "quantile":
            self.threshold = quantile_threshold(scores.cpu().numpy(), fpr, "clean_x")
        else:
            self.threshold = sigma_threshold(scores.cpu().numpy(), t, "clean_x")
        return self.threshold

    def predict(self, x) -> torch.Tensor:
        """Boolean ``(N,)``: True where the score is above the calibrated threshold (an infinite score is)."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__}.predict: call calibrate(clean_x, fpr=...) first")
        return self.score(x) > self.threshold
