"""Decision thresholds, one module for every caller (detectors' ``calibrate``, ``Guard``, ``screen``, ``export``).
Higher score = more suspicious; a sample is flagged when ``score > threshold``.

Rules of ``screen`` (:data:`THRESHOLD_RULES`):

- ``quantile``: clean reference scores' ``1 − fpr`` quantile (the higher order statistic, as
  :meth:`trojanguard.detect.Detector.calibrate`): about ``fpr`` of clean inputs are flagged. The rule to use:
  it is the only one that controls the false-positive rate. It needs at least ``⌈1/fpr⌉ − 1`` clean samples
  (below says why); fewer are an error.
- ``robust_z`` (no clean reference at hand): an outlier rule on the screened scores themselves, the modified
  z-score of Iglewicz & Hoaglin (1993): flag ``score > median + z · 1.4826 · MAD`` with ``z = 3.5``. Median
  and MAD ignore up to half of the data, so a poisoned minority does not move the threshold; for normally
  distributed clean scores it flags about 0.02 % of them. It does not control the false-positive rate
  (heavy-tailed clean scores are flagged more often) and it misses poison that is not an outlier of the
  whole set — calibrate on clean data when you can.
- ``fixed``: a threshold given by the caller.
- ``detector``: the detector's own decision rule (its ``DECISION_THRESHOLD``: PoisonCAM's classifier flags
  probability > 0.5), used when neither a threshold nor clean reference data is given.

``Detector.calibrate`` (:data:`CALIBRATION_RULES`) offers ``quantile`` and ``sigma`` (``μ + t·σ`` of clean scores).

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

import numpy as np

from trojanguard.errors import DataError

THRESHOLD_RULES = ("quantile", "robust_z", "fixed", "detector")  # how screen sets its threshold
CALIBRATION_RULES = ("quantile", "sigma")  # how Detector.calibrate sets one from clean scores
ROBUST_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): σ of a normal distribution from its median absolute deviation
MEAN_AD_TO_SIGMA = 1.2533  # √(π/2): σ from the mean absolute deviation, the fallback when MAD = 0



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


def sigma_threshold(clean_scores, t: float, name: str = "clean_x") -> float:
    """``μ + t·σ`` of the finite clean scores (at least 2)."""
    scores = np.asarray(clean_scores, dtype=np.float64).reshape(-1)
    scores = scores[np.isfinite(scores)]
    if len(scores) < 2:
        raise DataError(f"{name}: expected at least 2 finite clean scores to calibrate, got {len(scores)}")
    return float(scores.mean() + t * scores.std(ddof=1))


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
