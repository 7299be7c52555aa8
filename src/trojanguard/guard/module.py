"""The Guard: a classifier and a one-pass detector as one ``nn.Module`` returning logits, score and flag.

Serving contract (the same in PyTorch, in the exported ONNX graph and in :class:`GuardSession`):

- ``score`` is the detector's suspicion (higher = more suspicious); ``flagged = not (score <= threshold)``,
  so a NaN score is flagged too.
- Inputs that are not valid pixels — any NaN or ±Inf value, or a value outside ``input_range`` (default
  [0, 1]) — get ``score = +inf`` and ``flagged = True`` whatever the model says; the check is part of the
  graph, so a server running the raw ONNX file is as safe as one using :class:`GuardSession`.
- A row whose logits are not all finite (a model with NaN / infinite weights, or one that overflows on the
  input) gets ``score = +inf`` and ``flagged = True`` too: a NaN prediction is never served unflagged. Shape and
  dtype errors cannot be flagged per input: PyTorch and the session raise on them.
- ``policy="flag"`` returns the model's logits untouched; ``policy="reject"`` replaces the logits of
  flagged inputs by NaN (the prediction is withheld: softmax and any arithmetic on them stay NaN, so a
  consumer that ignores ``flagged`` cannot mistake them for a real prediction; ``argmax`` on NaN rows is
  meaningless — read ``flagged``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from trojanguard.detect.base import OnePass
from trojanguard.errors import check_choice
from trojanguard.models.adapters import Encoder, as_classifier, unwrap

POLICIES = ("flag", "reject")


class GuardOutput(NamedTuple):
    """logits: (N, K) (an encoder's guard: its features (N, D)); score: (N,) higher = more suspicious; flagged: bool
    (N,)."""

    logits: torch.Tensor
    score: torch.Tensor
    flagged: torch.Tensor


class Guard(nn.Module):
    """``forward(x) -> (logits (N, K), score (N,), flagged bool (N,))`` for ``x: (N, C, H, W)`` float32 in
    ``input_range``; :meth:`run` returns the same as a :class:`GuardOutput`, without gradients.

    Args:
        model: the classifier being served, a module or a :class:`~trojanguard.models.adapters.Classifier` (the
            detector must have been fitted on the same weights); or an
            :class:`~trojanguard.models.adapters.Encoder` (e.g. PoisonCAM's ``detector.encoder``): an encoder-only
            deployment, whose guard returns ``(features, score, flagged)`` (:attr:`output_names`).
        detector: a fitted one-pass detector (:class:`~trojanguard.detect.base.OnePass`: ``as_module(model)``
            returning ``x -> (logits, score)``), e.g. :class:`~trojanguard.detect.FeatureMahalanobis`.
        threshold: flag scores above it; None: the detector's calibrated threshold, if any (else call
            :meth:`calibrate` before use).
        policy: ``"flag"`` (logits unchanged) or ``"reject"`` (NaN logits for flagged inputs).
        input_range: ``(low, high)`` of valid pixel values; values outside, NaN and ±Inf flag the input.
            None checks only that values are finite.
    """

    def __init__(self, model: nn.Module, detector, threshold: float | None = None, policy: str = "flag", *,
                 input_range: tuple[float, float] | None = (0.0, 1.0)):
        super().__init__()
        # the Guard serves a Classifier (the user's module inside runs) or an Encoder (its features are served)
        self.serves = "features" if isinstance(model, Encoder) else "logits"
        model = model if isinstance(model, Encoder) else as_classifier(model).module
        check_choice("policy", policy, POLICIES)
        if not isinstance(detector, OnePass):
            raise TypeError(f"detector: Guard needs a one-pass detector (OnePass: as_module, input_shape; e.g. "
                            f"FeatureMahalanobis); got {type(detector).__name__}; per-input optimisation (Cognitive "
                            "Distillation) cannot run inside a served module")
        if input_range is not None:
            low, high = (float(v) for v in input_range)
            if not low < high:
                raise ValueError(f"input_range: expected (low, high) with low < high, got {input_range}")
            input_range = (low, high)
        _check_same_weights(model, detector)
        self.detector, self.policy, self.input_range = detector, policy, input_range
        self.scorer = detector.as_module(model)
        self.register_buffer("_threshold", torch.tensor(math.nan))
        self.threshold = detector.threshold if threshold is None else threshold

    @property
    def threshold(self) -> float | None:
        value = float(self._threshold)
        return None if math.isnan(value) else value

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"threshold: expected a finite number or None, got {value}")
        self._threshold.fill_(math.nan if value is None else float(value))

    @property
    def output_names(self) -> tuple[str, str, str]:
        """``("logits", "score", "flagged")``, or ``("features", …)`` for an encoder's guard (the ONNX outputs)."""
        return (self.serves, "score", "flagged")

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """``(C, H, W)`` of the detector's reference data."""
        return self.detector.input_shape

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, policy={self.policy!r}, input_range={self.input_range}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not torch.jit.is_tracing() and self.threshold is None:
            raise RuntimeError("Guard: no threshold; call guard.calibrate(clean_x, fpr=...) or pass threshold=")
        logits, score = self.scorer(x)
        # one test for both: the input's deviation plus the logits' l − l (0 where finite, NaN where NaN or ±Inf)
        trusted = self._input_deviation(x) + (logits - logits).sum(1) == 0
        score = torch.where(trusted, score, torch.tensor(math.inf, dtype=score.dtype, device=score.device))
        flagged = ~(score <= self._threshold)
        if self.policy == "reject":
            logits = torch.where(flagged[:, None], torch.full_like(logits, math.nan), logits)
        return logits, score, flagged

    def valid_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``(N,)``: every value of the input is finite and inside ``input_range``.

        ``x − clamp(x)`` is exactly 0 for a valid value and NaN, ±Inf or nonzero otherwise (NaN − anything is
        NaN, whatever the runtime's clamp does with NaN), so one sum of absolute values per input decides.
        ``abs().sum()``, not an L1 norm: ONNX Runtime's ReduceL1 is a generic, unvectorised reduction (3.7 µs
        at batch 1 and 190 µs at batch 64 on 3×32×32 inputs, against 1.2 µs and 27 µs for Abs + ReduceSum).
        Max/min reductions would need fewer passes but ONNX Runtime's ReduceMax/ReduceMin drop NaN.
        """
        return self._input_deviation(x) == 0

    def _input_deviation(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)``: 0 for a valid input, positive, NaN or ±Inf otherwise (see :meth:`valid_inputs`)."""
        dims = tuple(range(1, x.dim()))
        if self.input_range is None:
            return (x - x).sum(dims)  # x − x: 0 where finite, NaN where NaN or ±Inf
        return (x - x.clamp(*self.input_range)).abs().sum(dims)

    def run(self, x: torch.Tensor) -> GuardOutput:
        """``forward`` without gradients, as a named tuple."""
        with torch.no_grad():
            return GuardOutput(*self(x))

    def calibrate(self, clean_x, fpr: float = 0.01, *, rule: str = "quantile") -> float:
        """Set the threshold so about ``fpr`` of clean inputs are flagged (the detector's calibration on the same
        scores) and return it."""
        self.threshold = self.detector.calibrate(clean_x, fpr=fpr, rule=rule)
        return self.threshold


def _check_same_weights(model: nn.Module, detector) -> None:
    fitted_on = getattr(detector, "model", None)
    fitted_on = None if fitted_on is None else unwrap(fitted_on)
    if fitted_on is None or fitted_on is model:
        return
    mine, theirs = model.state_dict(), fitted_on.state_dict()
    same = mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine)
    if not same:
        raise ValueError("model: differs from the model the detector was fitted on (its statistics describe that "
                         "model's features); fit the detector on this model")
