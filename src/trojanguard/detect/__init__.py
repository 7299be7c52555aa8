"""Detectors of poisoned inputs: ``score(x) -> (N,)``, higher = more suspicious."""

from trojanguard.detect.amortized import AmortizedCD
from trojanguard.detect.base import Detector
from trojanguard.detect.cognitive_distillation import CognitiveDistillation, DistillationResult
from trojanguard.detect.feature_mahalanobis import FeatureMahalanobis

__all__ = ["AmortizedCD", "CognitiveDistillation", "Detector", "DistillationResult", "FeatureMahalanobis"]
