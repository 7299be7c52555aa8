"""The detector protocol: ``score(x) -> (N,)`` (higher = more suspicious), calibration and decisions."""

from __future__ import annotations

import torch

CALIBRATION_RULES = ("quantile", "sigma")


class Detector:
    """Base of every detector: subclasses implement :meth:`score`; this class adds thresholds.

    ``calibrate(clean_x, fpr)`` sets the threshold at the ``1 − fpr`` quantile of clean scores, so about
    ``fpr`` of clean inputs are flagged; ``rule="sigma"`` instead uses ``μ + t·σ`` of clean scores.
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
        if len(scores) < 2:
            raise ValueError("clean_x: need at least 2 clean samples to calibrate")
        if rule == "quantile":
            self.threshold = float(torch.quantile(scores, 1 - fpr, interpolation="higher"))
        else:
            self.threshold = float(scores.mean() + t * scores.std())
        return self.threshold

    def predict(self, x) -> torch.Tensor:
        """Boolean ``(N,)``: True where the score is above the calibrated threshold."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__}.predict: call calibrate(clean_x, fpr=...) first")
        return self.score(x) > self.threshold
