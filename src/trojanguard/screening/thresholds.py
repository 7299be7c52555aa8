"""Decision thresholds of a screening run (higher score = more suspicious; flag ``score > threshold``).

- ``quantile``: clean reference scores' ``1 − fpr`` quantile (the higher order statistic, as
  :meth:`trojanguard.detect.Detector.calibrate`): about ``fpr`` of clean inputs are flagged. The rule to use:
  it is the only one that controls the false-positive rate. It needs at least ``⌈1/fpr⌉ − 1`` clean samples
  (:mod:`trojanguard.detect.base` says why); fewer are an error.
- ``robust_z`` (no clean reference at hand): an outlier rule on the screened scores themselves, the modified
  z-score of Iglewicz & Hoaglin (1993): flag ``score > median + z · 1.4826 · MAD`` with ``z = 3.5``. Median
  and MAD ignore up to half of the data, so a poisoned minority does not move the threshold; for normally
  distributed clean scores it flags about 0.02 % of them. It does not control the false-positive rate
  (heavy-tailed clean scores are flagged more often) and it misses poison that is not an outlier of the
  whole set — calibrate on clean data when you can.
- ``fixed``: a threshold given by the caller.
"""

from __future__ import annotations

import numpy as np

from trojanguard.detect.base import quantile_threshold as detector_quantile_threshold

RULES = ("quantile", "robust_z", "fixed")
ROBUST_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): σ of a normal distribution from its median absolute deviation
MEAN_AD_TO_SIGMA = 1.2533  # √(π/2): σ from the mean absolute deviation, the fallback when MAD = 0


def quantile_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """The ``1 − fpr`` quantile of clean scores (higher order statistic): at most ``fpr`` of them lie above.
    The detectors' own rule (:func:`trojanguard.detect.base.quantile_threshold`): it needs at least
    ``⌈1/fpr⌉ − 1`` readable clean samples; NaN scores are left out, infinite ones count as most suspicious."""
    return detector_quantile_threshold(clean_scores, fpr, "calibration")


def robust_threshold(scores: np.ndarray, z: float = ROBUST_Z) -> float:
    """``median + z · σ̂`` with σ̂ = 1.4826 · MAD (or 1.2533 · mean absolute deviation when MAD = 0)."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]  # infinite scores are flagged whatever the threshold; NaN: not scored
    if len(values) < 3:
        raise ValueError(f"scores: the robust rule needs at least 3 readable samples, got {len(values)}; pass a "
                         "threshold or calibration data")
    median = float(np.median(values))
    deviation = np.abs(values - median)
    sigma = MAD_TO_SIGMA * float(np.median(deviation))
    if sigma == 0:
        sigma = MEAN_AD_TO_SIGMA * float(deviation.mean())
    return median + z * sigma
