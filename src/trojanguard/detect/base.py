"""The detector protocols: what a detector can do, declared once and checked where it is used.

- :class:`Detector`: ``score(x) -> (N,)`` (higher = more suspicious), ``calibrate`` and ``predict``;
  subclassing it gives the threshold rules below for free. ``screen`` needs only :class:`Scores`.
- :class:`Fitted`: ``fit(data)`` and ``fitted``; ``screen`` fits an unfitted one on reference data first.
- :class:`OnePass`: ``as_module(model) -> nn.Module`` returning ``(logits, score)`` in one forward pass, and the
  ``input_shape`` it was fitted on; what :class:`~trojanguard.guard.Guard` and ONNX export need.
- :class:`Explains`: ``explain(x, indices) -> {name: maps}``, the pictures of the screening report's grid (CD's
  masks and patterns).

How many clean samples a threshold needs. The ``quantile`` rule puts the threshold at an order statistic of
``n`` clean scores; a fresh clean input (exchangeable with them) lies above the k-th largest of them with
probability ``k / (n + 1)``, so even the largest clean score flags a fresh clean input with probability
``1 / (n + 1)``. A target ``fpr`` below that cannot be expressed: :func:`check_calibration_size` refuses
fewer than ``⌈1 / fpr⌉ − 1`` clean samples (99 for ``fpr = 0.01``) instead of silently delivering a higher
false-positive rate than asked for. The same rule holds for every detector, ``Guard.calibrate`` and
``screen``'s calibration.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from trojanguard.errors import DataError

CALIBRATION_RULES = ("quantile", "sigma")


class SampleSizeWarning(UserWarning):
    """A fit or calibration ran on fewer samples than its estimate needs to be reliable (the message says why)."""


def min_calibration_samples(fpr: float) -> int:
    """Fewest clean samples whose ``1 − fpr`` quantile can express ``fpr``: ``⌈1/fpr⌉ − 1`` (module docstring),
    and at least 2."""
    return max(2, math.ceil(1 / fpr - 1 - 1e-9))


def check_calibration_size(count: int, fpr: float, name: str = "clean_x") -> None:
    """DataError naming ``name`` when ``count`` clean samples cannot set a threshold for ``fpr``."""
    if count < 2:
        raise DataError(f"{name}: expected at least 2 clean samples to calibrate, got {count}")
    needed = min_calibration_samples(fpr)
    if count < needed:
        raise DataError(f"{name}: expected at least {needed} clean samples to calibrate for fpr {fpr:g} (the "
                        f"largest of n clean scores still flags 1/(n+1) of clean inputs), got {count}; pass more "
                        "clean data, a larger fpr or a fixed threshold")


def quantile_threshold(clean_scores, fpr: float, name: str = "clean_x") -> float:
    """The ``1 − fpr`` quantile (higher order statistic) of clean scores: at most ``fpr`` of them lie above.

    NaN scores (not scored) are left out; +inf scores are the highest possible suspicion and count. A DataError
    when too few scores remain for ``fpr`` or when the quantile itself is infinite."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr: expected a false-positive rate in (0, 1), got {fpr}")
    scores = np.asarray(clean_scores, dtype=np.float64).reshape(-1)
    scores = scores[~np.isnan(scores)]
    check_calibration_size(len(scores), fpr, name)
    threshold = float(np.quantile(scores, 1 - fpr, method="higher"))
    if not math.isfinite(threshold):
        raise DataError(f"{name}: expected finite detector scores on clean data, got {int(np.isinf(scores).sum())} "
                        f"infinite of {len(scores)}, more than fpr {fpr:g} of them; are these images valid inputs "
                        "of the model (range [0, 1], same preprocessing)?")
    return threshold


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
        if rule not in CALIBRATION_RULES:
            raise ValueError(f"rule: expected one of {CALIBRATION_RULES}, got {rule!r}")
        if not 0 < fpr < 1:
            raise ValueError(f"fpr: expected a false-positive rate in (0, 1), got {fpr}")
        scores = self.score(clean_x).double()
        if rule == "quantile":
            self.threshold = quantile_threshold(scores.cpu().numpy(), fpr, "clean_x")
        else:
            scores = scores[torch.isfinite(scores)]
            if len(scores) < 2:
                raise DataError(f"clean_x: expected at least 2 finite clean scores to calibrate, got {len(scores)}")
            self.threshold = float(scores.mean() + t * scores.std())
        return self.threshold

    def predict(self, x) -> torch.Tensor:
        """Boolean ``(N,)``: True where the score is above the calibrated threshold (an infinite score is)."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__}.predict: call calibrate(clean_x, fpr=...) first")
        return self.score(x) > self.threshold
