"""Noise fragility: how readily the model gives up its prediction of an image under small Gaussian pixel noise.

Score of an image: the model's probability ``p`` of the class it predicts for the clean image, averaged over a fixed
bank of ``draws`` noisy copies ``clip(x + σ·ε_k, 0, 1)``; reported as the log-odds of losing it,
``log((1 − p + ε) / (p + ε))`` (ε = 1e-4 keeps the two ends finite) — higher = more fragile. The noise bank is drawn
once from ``seed`` for the image shape and shared by every image, so a score is a function of the image alone
(batch- and order-independent) and costs ``draws`` forward passes.

Why it reads a trigger. A clean image's class rests on its content, which survives noise far below its contrast. A
poisoned image's class rests on its trigger; most triggers are strong patterns the noise does not erase (their poison
is *less* fragile than clean images), but a trigger the model was trained to read *precisely* — WaNet's warp, whose
noise mode teaches the model that the same warp with a little jitter keeps the true label — is a low-amplitude
signal that the noise drowns: such poison fall back to their source class under noise that no clean image of the
set notices. Alone this is not a detector (clean images of hard classes are fragile too, and strong triggers invert
it); :class:`~trojanguard.detect.Ensemble` uses it only through :func:`fragile_class`, where the fragile images of a
whole set gather in one class (measured in ``benchmarks/RESULTS.md``, "Noise fragility").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trojanguard.data.batching import iter_image_batches
from trojanguard.detect.base import Detector
from trojanguard.errors import DataError, check_positive_int
from trojanguard.models.adapters import Classifier, as_classifier
from trojanguard.models.features import model_device, working_copy
from trojanguard.progress import progress_bar

DEFAULT_SIGMA = 0.05  # of the [0, 1] pixel range: well below a digit's or photo's contrast
DEFAULT_DRAWS = 16
LOG_ODDS_EPS = 1e-4
TOP_FRACTION = 0.15  # the most fragile share of a set the class test reads: above the highest poison rate screened
MAJORITY = 0.5  # the fired class must hold more than this share of the most fragile images
ALPHA = 1e-3  # and hold them significantly more than its share of the set (one-sided hypergeometric test)
STABLE_GATE = 2.0  # the stable class fires only where class concentration's enrichment of it is at most this; chosen
# leave one family out among 1, 1.5, 2, 3 and no gate (benchmarks/RESULTS.md, "Noise fragility")
TIE_BREAK = 1e-6  # two ranks' sums tie often (both are multiples of 1 / 2n): the fused rank's weight above the other's


class NoiseFragility(Detector):
    """Log-odds that the model loses its predicted class under small Gaussian pixel noise (module docstring).

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] and returning ``(N, K)`` logits;
            never modified (the detector runs a private copy).
        sigma: the noise's standard deviation, in pixel units of [0, 1]; > 0.
        draws: noisy copies per image (forward passes).
        batch_size: images per forward pass. seed: the noise bank's seed.
        show_progress: progress bar over batches.

    Needs no fit. :meth:`score_with_classes` also returns the model's classes of the clean images.
    """

    model_kind = Classifier

    def __init__(self, model: nn.Module, *, sigma: float = DEFAULT_SIGMA, draws: int = DEFAULT_DRAWS,
                 batch_size: int = 256, seed: int = 0, show_progress: bool = True):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma: expected a positive noise level in pixel units of [0, 1], got {sigma!r}")
        check_positive_int("draws", draws)
        check_positive_int("batch_size", batch_size)
        self.model = as_classifier(model).module
        self.sigma, self.draws, self.batch_size, self.seed = float(sigma), draws, batch_size, seed
        self.show_progress = show_progress
        self._net: nn.Module | None = None
        self._bank: torch.Tensor | None = None  # (draws, C, H, W), drawn for the first image shape seen

    def __repr__(self) -> str:
        return (f"NoiseFragility(sigma={self.sigma!r}, draws={self.draws!r}, batch_size={self.batch_size!r}, "
                f"seed={self.seed!r})")

    def score(self, x) -> torch.Tensor:
        """Fragility ``(N,)`` float64, higher = the prediction is lost more readily under noise."""
        return self.score_with_classes(x)[0]

    def score_with_classes(self, x, *, show_progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fragility (N,) float64, the model's classes of the clean images (N,))``; ``show_progress``: overrides
        the detector's for this call."""
        if self._net is None:
            self._net, _ = working_copy(self.model)
        device = model_device(self._net)
        scores, classes = [], []
        enable = self.show_progress if show_progress is None else show_progress
        bar = progress_bar(None, desc="noise fragility", unit="img", enable=enable)
        try:
            for xb, _ in iter_image_batches(x, self.batch_size):
                bank = self._noise_bank(tuple(xb.shape[1:])).to(device)
                xb = xb.to(device, torch.float32)
                with torch.no_grad():
                    predicted = self._net(xb).argmax(1)
                    kept = torch.zeros(len(xb), dtype=torch.float64, device=device)
                    for noise in bank:
                        probabilities = self._net((xb + noise).clamp(0, 1)).float().softmax(1)
                        kept += probabilities.gather(1, predicted[:, None])[:, 0].double()
                kept = (kept / len(bank)).cpu()
                scores.append(torch.log((1 - kept + LOG_ODDS_EPS) / (kept + LOG_ODDS_EPS)))
                classes.append(predicted.cpu())
                bar.update(len(xb))
        finally:
            bar.close()
        if not scores:
            raise DataError("x: no images to score")
        return torch.cat(scores), torch.cat(classes)

    def _noise_bank(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._bank is None or tuple(self._bank.shape[1:]) != shape:
            g = torch.Generator().manual_seed(self.seed)
            self._bank = self.sigma * torch.randn((self.draws, *shape), generator=g)
        return self._bank


def fragile_class(fragility: torch.Tensor, predicted: torch.Tensor, num_classes: int, *,
                  top_fraction: float = TOP_FRACTION, majority: float = MAJORITY, alpha: float = ALPHA
                  ) -> tuple[int | None, float, float]:
    """The class where a set's noise-fragile images gather, if one does: ``(class or None, its share of the most
    fragile images, p-value)``.

    The most fragile ``top_fraction`` of the set (by ``fragility`` (n,), the images' ``predicted`` classes (n,)) are
    counted per class; the class holding most of them fires when it holds more than ``majority`` of them *and* more
    than its share of the whole set would explain (one-sided hypergeometric p < ``alpha``). Clean images that are
    fragile (hard examples) spread over several classes; poison whose trigger noise erases are one class's.
    """
    from scipy.stats import hypergeom

    values = fragility.double()
    predicted = torch.as_tensor(predicted).long().flatten()
    if predicted.shape != values.shape:
        raise ValueError(f"predicted: expected ({len(values)},) classes, got {tuple(predicted.shape)}")
    finite = torch.isfinite(values)
    n = int(finite.sum())
    top = math.ceil(top_fraction * n)
    if n < 4 or top < 2:
        return None, 0.0, 1.0
    order = torch.argsort(torch.where(finite, values, torch.tensor(-math.inf, dtype=torch.float64)),
                          descending=True, stable=True)
    hits = torch.bincount(predicted[order[:top]], minlength=num_classes)
    counts = torch.bincount(predicted[finite], minlength=num_classes)
    c = int(hits.argmax())
    share = float(hits[c]) / top
    p = float(hypergeom.sf(int(hits[c]) - 1, n, int(counts[c]), top))  # P(at least hits[c] of top by chance)
    return (c if share > majority and p < alpha else None), share, p


def outliers_gather_elsewhere(outliers: torch.Tensor, predicted: torch.Tensor, cls: int, *, alpha: float = ALPHA
                              ) -> bool:
    """Whether the ``outliers`` (n,) bool shun class ``cls`` *and* gather in another of the images' ``predicted``
    classes (n,): ``cls`` holds significantly fewer of them than its share (one-sided hypergeometric lower tail p <
    ``alpha``) and some other class significantly more (upper tail p < ``alpha``). The ensemble's veto on a fired
    fragile class: where the members' own outliers point at another class, the fired class's fragile images are hard
    clean images (a noise-like trigger makes noise itself evoke the target, and the class nearest the target is then
    the fragile one), not poison. Outliers that only spread over the other classes (cover samples, which keep their
    true labels) do not veto: the fragile class may then hold the poison the members miss."""
    from scipy.stats import hypergeom

    outliers = torch.as_tensor(outliers).bool().flatten()
    predicted = torch.as_tensor(predicted).long().flatten()
    if outliers.shape != predicted.shape:
        raise ValueError(f"predicted: expected ({len(outliers)},) classes, got {tuple(predicted.shape)}")
    n, top = len(outliers), int(outliers.sum())
    if not top:
        return False
    counts = torch.bincount(predicted, minlength=cls + 1)
    hits = torch.bincount(predicted[outliers], minlength=len(counts))
    if not hypergeom.cdf(int(hits[cls]), n, int(counts[cls]), top) < alpha:
        return False
    return any(hypergeom.sf(int(hits[c]) - 1, n, int(counts[c]), top) < alpha
               for c in range(len(counts)) if c != cls and hits[c] > 0)


def stable_class(fragility: torch.Tensor, predicted: torch.Tensor, enrichment: torch.Tensor, *,
                 gate: float = STABLE_GATE) -> tuple[int | None, float, float]:
    """The class where a set's noise-*stable* images gather, if one does and class concentration has not already
    found it: ``(class or None, share, p-value)``. :func:`fragile_class` on the negated ``fragility``, kept only
    where the class's ``enrichment`` (K,) among the fused outliers (:func:`~trojanguard.detect.ensemble.
    concentration_of`) is at most ``gate``.

    Why: most triggers survive noise that moves clean images, so their poison are the set's most stable images and,
    all-to-one, one class's. Clean images of an easy class are stable too, and where concentration already raised the
    target class, raising its stable images again lifts its clean ones over the poison of the adaptive attacks; so
    the stable class speaks only where the outliers did not point at it (measured in ``benchmarks/RESULTS.md``)."""
    fired, share, p = fragile_class(-fragility.double(), predicted, len(enrichment))
    if fired is not None and float(enrichment[fired]) > gate:
        fired = None
    return fired, share, p


def place_by_fragility(reference_fused: torch.Tensor, reference_fragility: torch.Tensor,
                       reference_predicted: torch.Tensor, fused: torch.Tensor, fragility: torch.Tensor,
                       predicted: torch.Tensor, fired: int) -> torch.Tensor:
    """Fused scores ``(N,)`` re-placed so that the fired class's fragile images rise: each image's combined rank
    ``F_fused(fused) + [predicted = fired] · F_fragility(fragility)`` (empirical CDFs over the fit data's ``reference_``
    scores) is mapped back onto the fit data's fused scores at the same quantile. On the fit data the fused values
    are the same multiset in a new order (so ``screen``'s robust rule flags as many images as before); other images
    land where their combined rank falls, beyond the fit data's range as its fused tails extend. NaN stays NaN."""
    from trojanguard.detect.ensemble import empirical_cdf, empirical_quantile

    def combined(f: torch.Tensor, frag: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        boost = torch.where(torch.as_tensor(pred).long() == fired, empirical_cdf(reference_fragility, frag), 0.0)
        rank = empirical_cdf(reference_fused, f)
        return rank * (1 + TIE_BREAK) + torch.nan_to_num(boost, nan=0.0)  # equal sums ordered by the fused score

    reference = combined(reference_fused, reference_fragility, reference_predicted)
    out = empirical_quantile(reference_fused, empirical_cdf(reference, combined(fused, fragility, predicted)))
    out[torch.isnan(fused)] = math.nan
    return out.to(fused.dtype)
